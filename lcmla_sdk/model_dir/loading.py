"""Loading a model by name: an embedded preset (seeded random weights) or a model directory, read in one pass
(:func:`.format.read_layout`), checked (:func:`.checks.check`) and built from its files (:func:`.building.load`);
either way the shared UNet is wired for LCM-Lookahead once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..decoding import load_tiny_vae
from ..errors import ModelFilesError
from ..faces import AUTO
from ..integrity import sha256_json
from ..presets import PRESETS, Components, build_random_components, preset_config
from .building import load
from .checks import check
from .format import ModelLayout, read_layout


@dataclass
class LoadedModel:
    """What a :class:`~lcmla_sdk.Personalizer` is made of: its components (the UNet wired), the fingerprint of
    their weights, the face backend asked for, and the model directory they were loaded from (``None``: random)."""

    components: Components
    fingerprint: str
    faces: str | Path | None = AUTO
    source: ModelLayout | None = None


def device_and_dtype(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """fp16 on a GPU, fp32 on the CPU, unless told otherwise."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)


def load_model(
    name: str | Path, device: torch.device, dtype: torch.dtype, seed: int = 0, faces: str | Path | None = AUTO,
    tiny_vae: str | Path | None = None, verify: bool = True,
) -> LoadedModel:  # fmt: skip
    """An embedded preset (:func:`random_model`), or a model directory: validated (:func:`.checks.validate`, with
    the sha256 of its files when ``verify``), then loaded in ``dtype``; ``faces="auto"`` takes its face pack if it
    has one. ``tiny_vae``: a local ``AutoencoderTiny`` folder instead of the model's."""
    if str(name) in PRESETS:
        model = random_model(str(name), device, dtype, seed, faces)
    elif not Path(name).expanduser().is_dir():
        raise ModelFilesError(f"name: {name!r} is neither a model directory nor an embedded preset {PRESETS}")
    else:
        layout = read_layout(Path(name).expanduser())
        layout = check(layout, verify)
        if faces == AUTO and "faces" in layout.components:
            faces = layout.components["faces"].path
        model = LoadedModel(load(layout, dtype), layout.fingerprint(), faces, layout)
    if tiny_vae is not None:
        model.components.tiny_vae = load_tiny_vae(tiny_vae)
    return model


def random_model(
    label: str, device: torch.device, dtype: torch.dtype, seed: int = 0, faces: str | Path | None = AUTO,
    config: dict[str, Any] | None = None,
) -> LoadedModel:  # fmt: skip
    """Seeded random weights for the embedded preset ``label``, or for an architecture ``config`` given as
    constructor arguments (the presets' JSON format), drawn on ``device`` in ``dtype``
    (:func:`~lcmla_sdk.presets.build_random_components`). The CPU's and a GPU's random streams differ, so the device
    kind is part of the fingerprint."""
    config = preset_config(label) if config is None else config
    recipe = {"preset": label, "seed": seed, "dtype": str(dtype), "config": config}
    if device.type != "cpu":
        recipe["drawn_on"] = device.type
    return LoadedModel(build_random_components(config, seed, dtype, device), sha256_json(recipe), faces)


def place_on_device(components: Components, device: torch.device, dtype: torch.dtype) -> None:
    """Every module of ``components`` frozen, in eval mode, on ``device`` in ``dtype``, in place; the VAE in fp32
    where its config asks for upcasting (the stock SDXL VAE overflows in fp16)."""
    for name in ("unet", "image_encoder", "resampler", "text_encoder", "text_encoder_2", "vae", "tiny_vae"):
        module = getattr(components, name)
        if module is not None:
            upcast = name == "vae" and module.config.force_upcast
            # nn.Module.to: diffusers' own .to warns for models with no fp32-only modules.
            torch.nn.Module.to(module, device=device, dtype=torch.float32 if upcast else dtype)
            module.eval().requires_grad_(False)
