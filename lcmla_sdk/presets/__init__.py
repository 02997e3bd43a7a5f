"""Embedded architecture presets: constructor arguments of every component, as JSON.

``tiny``  small widths, SDXL's block types and 70-layer K/V pattern; runs on a CPU in seconds.
``sdxl``  the full SDXL-base architecture (random weights: for export and benchmarks, not for images).

``training.json`` holds the parts only training builds (ArcFace), apart from ``<name>.json`` because a preset's
config is its model's fingerprint; :func:`preset_part` reads a part from either.
"""

from __future__ import annotations

import json
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

PRESETS = ("tiny", "sdxl")


@dataclass
class Components:
    """Every module a :class:`~lcmla_sdk.Personalizer` is made of, before LCM-Lookahead wiring."""

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
    ``device`` in ``dtype`` (a full-size model builds in seconds on a GPU instead of minutes on a CPU)."""
    device = torch.device(device)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            return _build(config)
        finally:
            torch.set_default_dtype(previous)


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
