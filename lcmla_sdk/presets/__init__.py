"""Embedded architecture presets: constructor arguments of every component, as JSON.

``tiny``  small widths, SDXL's block types and 70-layer K/V pattern; runs on a CPU in seconds.
``sdxl``  the full SDXL-base architecture (random weights: for export and benchmarks, not for images).

``training.json`` holds the parts only training builds (ArcFace), apart from ``<name>.json`` because a preset's
config is its model's fingerprint; :func:`preset_part` reads a part from either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..lora import add_random_lcm_lora
from ..wiring import wire_unet

PRESETS = ("tiny", "sdxl")


@dataclass
class Components:
    """Every module a :class:`~lcmla_sdk.Personalizer` is made of (loaders wire the UNet for LCM-Lookahead:
    :func:`lcmla_sdk.wiring.wire_unet`)."""

    config: dict[str, Any]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    image_encoder: CLIPVisionModelWithProjection
    resampler: IPAdapterPlusImageProjection
    tiny_vae: AutoencoderTiny | None = None  # TAESD-XL, for previews (vae="tiny")


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; expected one of {PRESETS}.")
    return _read(f"{name}.json")


def preset_part(name: str, part: str) -> Any:
    """Constructor arguments of one component of preset ``name``: a model part (``"tiny_vae"``) or a part only
    training builds (``"arcface"``)."""
    config = preset_config(name)
    return config[part] if part in config else _read("training.json")[name][part]


def _read(file: str) -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(file).read_text())


def tiny_tokenizer() -> CLIPTokenizer:
    """The character-level CLIP tokenizer shipped with the package (no hub access)."""
    with resources.as_file(resources.files("lcmla_sdk").joinpath("assets/tiny_tokenizer")) as path:
        return CLIPTokenizer.from_pretrained(str(path))


def build_random_components(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Components:
    """Instantiate every component from its constructor arguments with seeded random weights, drawn directly on
    ``device`` in ``dtype`` (a full-size model builds in seconds on a GPU instead of minutes on a CPU); the UNet is
    wired for LCM-Lookahead with random weights there too, so every path affects the output."""
    device = torch.device(device)
    with drawn_on(device, dtype, seed):
        components = _build(config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        _randomise_lookahead(components.unet, config, seed)
    return components


@contextmanager
def drawn_on(device: str | torch.device, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """New modules' weights are drawn on ``device`` in ``dtype`` from ``seed``; the global random state and the
    default dtype are as they were afterwards."""
    device = torch.device(device)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def _randomise_lookahead(unet: UNet2DConditionModel, config: dict[str, Any], seed: int) -> None:
    """Wire the UNet and draw LCM-Lookahead's weights: IP K/V, the KV-encoder LoRA's B (its A is drawn by
    :func:`~lcmla_sdk.wiring.wire_unet`) and, if the preset has one, an LCM-LoRA."""
    blocks = wire_unet(unet, config["kv_encoder"], seed=seed + 1)
    torch.manual_seed(seed + 2)
    for name in blocks:
        processor = unet.get_submodule(name).attn2.processor
        torch.nn.init.normal_(processor.to_k_ip.weight, std=processor.to_k_ip.in_features**-0.5)
        torch.nn.init.normal_(processor.to_v_ip.weight, std=processor.to_v_ip.in_features**-0.5)
    for param_name, param in unet.named_parameters():
        if ".lora_B.kv_encoder" in param_name:
            torch.nn.init.normal_(param, std=0.02)
    if config.get("lcm_lora"):
        add_random_lcm_lora(unet, config["lcm_lora"]["rank"])


def _build(config: dict[str, Any]) -> Components:
    tokenizer = tiny_tokenizer()
    return Components(
        config=config,
        unet=UNet2DConditionModel(**config["unet"]),
        vae=AutoencoderKL(**config["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**config["image_encoder"])),
        resampler=IPAdapterPlusImageProjection(**config["resampler"]),
        tiny_vae=AutoencoderTiny(**config["tiny_vae"]) if "tiny_vae" in config else None,
    )
