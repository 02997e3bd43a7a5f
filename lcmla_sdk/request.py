"""The arguments of one ``generate`` call: written once, here, as the keyword-only :class:`Request`, checked (types
and ranges: :mod:`lcmla_sdk.validation`) and normalised by :meth:`Request.from_call`, and laid out as the sampling
loop's inputs by :meth:`Request.step_inputs`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from . import validation
from .decoding import OUTPUTS, VAES
from .defaults import AUTHORS_FREEU, DEFAULT_GUIDANCE, MODES
from .freeu import stage_values
from .guidance import Guidance
from .identity import Identity
from .noise import FACE_NOISES, Noise
from .sampling import Embeddings, StepInputs
from .text import time_ids
from .transfer import device_tensor, to_device


@dataclass(frozen=True, kw_only=True)
class Request:
    """The keywords of ``Personalizer.generate`` and their defaults.

    ``mode="quality"``: DPM-Solver++ with three-branch guidance ``guidance`` = (no_kv, full, kv).
    ``mode="fast"``: LCM scheduler with the LCM-LoRA denoiser, conditional branch only. ``steps``: by default each
    mode's in :data:`MODES`. ``use_kv=False``: IP-Adapter only, i.e. plain CFG with scale ``no_kv + full``; ``None``:
    the model's default (``Personalizer.has_kv_encoder``). ``kv_cache=True``: the K/V-encoder's output for the
    schedule is computed once per identity, with the identity's fixed reference noise (``face_noise="fixed"``)
    instead of each image's initial noise (the authors' pairing), and reused by later calls. ``vae="tiny"``: decode
    with the tiny VAE (previews). ``freeu``: (b1, b2, s1, s2) of FreeU on the denoiser, as the authors' README
    enables it (their code changes the second up-stage only, with b2 and s2; :mod:`lcmla_sdk.freeu`); ``None``
    turns it off. ``callback(step_index, timestep, latents)`` runs after every step.

    :meth:`from_call` checks them and normalises them: ``prompt``, ``negative_prompt`` and ``seed`` become lists
    (one prompt per prompt row, one seed per image), ``steps``, ``height``, ``width``, ``use_kv`` and
    ``face_noise`` their values for the model, ``guidance`` a :class:`Guidance`.
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    num_images: int = 1
    seed: int | Sequence[int] | None = None
    mode: str = "quality"
    steps: int | None = None  # None: the mode's default, MODES
    guidance: Sequence[float] = DEFAULT_GUIDANCE  # (no_kv, full, kv) of three-branch guidance
    height: int | None = None  # None: the model's default size
    width: int | None = None
    use_kv: bool | None = None  # None: the model's default (Personalizer.has_kv_encoder)
    adapter_scale: float = 1.0
    output: str = "pil"
    callback: Callable[[int, int, Any], Any] | None = None  # callback(step_index, timestep, latents)
    kv_cache: bool = False
    face_noise: str | None = None  # None: "fixed" with the K/V cache, else "paired"
    vae: str = "full"
    freeu: Sequence[float] | None = AUTHORS_FREEU

    @classmethod
    def from_call(cls, model: Any, **arguments: Any) -> Request:
        """The arguments of ``model.generate`` checked (``ValueError`` naming the argument, before any work) and
        normalised."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**arguments)._checked(model)

    def _checked(self, model: Any) -> Request:
        # Types and ranges: lcmla_sdk.validation (its docstring states every range and the memory budget).
        prompts = validation.strings(self.prompt, "prompt")
        negatives = None
        if self.negative_prompt is not None:
            negatives = validation.strings(self.negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts) if isinstance(self.negative_prompt, str) else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
        num_images = validation.integer(self.num_images, "num_images", 1)
        batch = len(prompts) * num_images
        mode = validation.choice(self.mode, "mode", tuple(MODES))
        if mode == "fast" and not model.has_lcm:
            raise ValueError("mode: 'fast' needs an LCM-LoRA, and this model has none")
        steps = validation.steps(self.steps, mode, MODES[mode])
        guidance = validation.guidance(self.guidance)
        height = validation.image_side(self.height, "height", model.default_size, model.size_multiple)
        width = validation.image_side(self.width, "width", model.default_size, model.size_multiple)
        use_kv = model.has_kv_encoder if self.use_kv is None else validation.flag(self.use_kv, "use_kv")
        if use_kv and not model.has_kv_encoder:
            raise ValueError(
                "use_kv: this model was converted from the authors' no-K/V checkpoint, whose K/V-encoder was not "
                "trained for generation; use use_kv=False (its default: IP-Adapter only, plain CFG)"
            )
        adapter_scale = validation.number(self.adapter_scale, "adapter_scale", 0.0, validation.MAX_WEIGHT)
        output = validation.choice(self.output, "output", OUTPUTS)
        validation.callback(self.callback)
        kv_cache = validation.flag(self.kv_cache, "kv_cache")
        if kv_cache and not use_kv:
            raise ValueError("kv_cache: caches the K/V-encoder's output, so it needs use_kv=True")
        if kv_cache and len(set(negatives or [None])) > 1:
            raise ValueError("kv_cache: the cached unconditional K/V need one negative prompt for every image")
        face_noise = ("fixed" if kv_cache else "paired") if self.face_noise is None else self.face_noise
        validation.choice(face_noise, "face_noise", FACE_NOISES)
        if kv_cache and face_noise != "fixed":
            raise ValueError("face_noise: the K/V cache is computed with the identity's fixed noise; use 'fixed'")
        validation.choice(self.vae, "vae", VAES)
        if self.vae == "tiny" and model.decoder.tiny_vae is None:
            raise ValueError("vae: 'tiny' needs a tiny VAE: from_pretrained(..., tiny_vae=DIR) with a local TAESD-XL folder")
        freeu = validation.freeu(self.freeu)
        validation.check_memory(
            validation.generation_bytes(model, batch, height, width, mode, use_kv), model.device,
            f"num_images/height/width ({batch} images of {height}x{width}, {mode} mode)",
            "generate fewer or smaller images per call",
        )  # fmt: skip
        seeds = validation.seeds(self.seed, batch) or [random.SystemRandom().randrange(2**32) for _ in range(batch)]
        return replace(
            self, prompt=prompts, negative_prompt=negatives, num_images=num_images, seed=seeds, mode=mode, steps=steps,
            guidance=Guidance(*map(float, guidance)), height=height, width=width, use_kv=use_kv,
            adapter_scale=float(adapter_scale), output=output, kv_cache=kv_cache, face_noise=face_noise, freeu=freeu,
        )  # fmt: skip

    def step_inputs(self, identities: Sequence[Identity], prompts: tuple[Embeddings, Embeddings], noise: Noise,
                    encoder_prompt: Callable[[], Embeddings], device: torch.device,
                    dtype: torch.dtype) -> StepInputs:  # fmt: skip
        """This checked call's :class:`~lcmla_sdk.sampling.StepInputs`, one row per image: each prompt's embeddings
        (``prompts``: the prompts' and the negatives', one row per prompt) and identity (``identities``, one per
        prompt) repeated for its images; ``encoder_prompt`` is called only when the call uses K/V."""
        rows, images, quality = len(self.seed), self.num_images, self.mode == "quality"
        (text, pooled), (neg_text, neg_pooled) = ((x.repeat_interleave(images, 0) for x in pair) for pair in prompts)

        def per_image(name: str) -> torch.Tensor:
            return torch.cat([to_device(getattr(i, name), device, dtype).expand(images, -1, -1) for i in identities])

        return StepInputs(
            latents=noise.latents, text=text, pooled=pooled, neg_text=neg_text, neg_pooled=neg_pooled,
            image_tokens=per_image("cond_tokens"), uncond_image_tokens=per_image("uncond_tokens"),
            adapter_scale=torch.full((rows,), self.adapter_scale, device=device),
            time_ids=time_ids(self.height, self.width, rows, dtype, device),
            guidance=device_tensor(self.guidance, device, torch.float32) if quality else None,
            freeu=stage_values(self.freeu, device) if self.freeu is not None else None,
            encoder_prompt=encoder_prompt() if self.use_kv else None,
            face_latents=noise.face_latents, face_noise=noise.face_noise,
        )  # fmt: skip
