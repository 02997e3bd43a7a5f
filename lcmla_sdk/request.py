"""The arguments of one ``generate`` call, checked (types and ranges: :mod:`lcmla_sdk.validation`) and normalised."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import validation
from .decoding import OUTPUTS, VAES
from .defaults import AUTHORS_FREEU, MODES
from .guidance import Guidance
from .noise import FACE_NOISES


@dataclass
class Request:
    """Validated, normalised arguments of one ``generate`` call."""

    prompts: list[str]
    negative_prompts: list[str] | None
    seeds: list[int]
    mode: str
    steps: int
    guidance: Guidance
    height: int
    width: int
    use_kv: bool
    adapter_scale: float
    kv_cache: bool
    face_noise: str
    vae: str
    output: str
    freeu: tuple[float, float, float, float] | None



def check_request(
    model: Any,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None,
    num_images: int,
    seed: int | Sequence[int] | None,
    mode: str,
    steps: int | None,
    guidance: Sequence[float],
    height: int | None,
    width: int | None,
    use_kv: bool | None,
    adapter_scale: float,
    output: str,
    callback: Any,
    kv_cache: bool = False,
    face_noise: str | None = None,
    vae: str = "full",
    freeu: Sequence[float] | None = AUTHORS_FREEU,
) -> Request:
    """The arguments of ``model.generate`` checked (``ValueError`` naming the argument, before any work) and
    normalised; ``Personalizer.check_inputs`` is this function."""
    # Types and ranges: lcmla_sdk.validation (its docstring states every range and the memory budget).
    prompts = validation.strings(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        negatives = validation.strings(negative_prompt, "negative_prompt")
        negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
    num_images = validation.integer(num_images, "num_images", 1)
    batch = len(prompts) * num_images
    mode = validation.choice(mode, "mode", tuple(MODES))
    if mode == "fast" and not model.has_lcm:
        raise ValueError("mode: 'fast' needs an LCM-LoRA, and this model has none")
    steps = validation.steps(steps, mode, MODES[mode])
    guidance = validation.guidance(guidance)
    height = validation.image_side(height, "height", model.default_size, model.size_multiple)
    width = validation.image_side(width, "width", model.default_size, model.size_multiple)
    use_kv = model.has_kv_encoder if use_kv is None else validation.flag(use_kv, "use_kv")
    if use_kv and not model.has_kv_encoder:
        raise ValueError(
            "use_kv: this model was converted from the authors' no-K/V checkpoint, whose K/V-encoder was not "
            "trained for generation; use use_kv=False (its default: IP-Adapter only, plain CFG)"
        )
    adapter_scale = validation.number(adapter_scale, "adapter_scale", 0.0, validation.MAX_WEIGHT)
    output = validation.choice(output, "output", OUTPUTS)
    validation.callback(callback)
    kv_cache = validation.flag(kv_cache, "kv_cache")
    if kv_cache and not use_kv:
        raise ValueError("kv_cache: caches the K/V-encoder's output, so it needs use_kv=True")
    if kv_cache and len(set(negatives or [None])) > 1:
        raise ValueError("kv_cache: the cached unconditional K/V need one negative prompt for every image")
    face_noise = ("fixed" if kv_cache else "paired") if face_noise is None else face_noise
    validation.choice(face_noise, "face_noise", FACE_NOISES)
    if kv_cache and face_noise != "fixed":
        raise ValueError("face_noise: the K/V cache is computed with the identity's fixed noise; use 'fixed'")
    validation.choice(vae, "vae", VAES)
    if vae == "tiny" and model.decoder.tiny_vae is None:
        raise ValueError("vae: 'tiny' needs a tiny VAE: from_pretrained(..., tiny_vae=DIR) with a local TAESD-XL folder")
    freeu = validation.freeu(freeu)
    validation.check_memory(
        validation.generation_bytes(model, batch, height, width, mode, use_kv), model.device,
        f"num_images/height/width ({batch} images of {height}x{width}, {mode} mode)",
        "generate fewer or smaller images per call",
    )  # fmt: skip
    seeds = validation.seeds(seed, batch) or [random.SystemRandom().randrange(2**32) for _ in range(batch)]
    return Request(
        prompts, negatives, seeds, mode, steps, Guidance(*map(float, guidance)), height, width, use_kv,
        float(adapter_scale), kv_cache, face_noise, vae, output, freeu,
    )  # fmt: skip
