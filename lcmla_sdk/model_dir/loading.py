"""Loading a model: a validated model directory (every module built from its files) or an embedded preset (seeded
random weights), the shared UNet wired for LCM-Lookahead once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from ..decoding import load_tiny_vae
from ..errors import ModelFilesError
from ..faces import AUTO
from ..integrity import sha256_json
from ..presets import PRESETS, Components, build_random_components, preset_config
from ..text import load_tokenizer
from ..weights import load_ip_adapter, load_lcm_lora, load_module_state, read_state_dict
from ..wiring import LookaheadWeights, wire_unet
from .checks import check
from .format import DIFFUSERS_PARTS, ModelLayout, file_header, read_layout, weight_file

# The authors' pipeline settings, for directories whose index does not name them.
PIPELINE_DEFAULTS = {"encoder_prompt": "A photo of a face", "face_size": 1024}


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


def load(layout: ModelLayout, dtype: torch.dtype) -> Components:
    """Build every module from the validated files, with LCM-Lookahead's weights on the shared UNet."""
    configs, files, components = layout.configs, layout.weight_files, layout.components
    sdxl = components["sdxl"]
    vae_dir = components["vae"].path if "vae" in components else None
    parts = load_sdxl(sdxl.path, dtype, sdxl.options.get("variant"), vae_dir)
    unet = parts["unet"]
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        components["image_encoder"].path, variant=components["image_encoder"].options.get("variant"), dtype=dtype,
        local_files_only=True,
    )  # fmt: skip

    sources = {part: str(files[part]) for part in ("ip_kv", "kv_projections", "kv_lora") if part in files}
    if "ip_adapter" in files:
        ip_adapter = load_ip_adapter(files["ip_adapter"], unet, configs.get("resampler"))
        resampler, resampler_config, ip_kv = ip_adapter.resampler, ip_adapter.resampler_config, ip_adapter.ip_kv
        sources["ip_kv"] = ip_adapter.ip_kv_source
    else:
        resampler_config = configs["resampler"]
        resampler = IPAdapterPlusImageProjection(**resampler_config)
        load_module_state(resampler, read_state_dict(files["resampler"]), str(files["resampler"]))
        ip_kv = read_state_dict(files["ip_kv"])
    added = LookaheadWeights(ip_kv, read_state_dict(files["kv_projections"]), read_state_dict(files["kv_lora"]), sources)
    settings = {"scheduler": configs["scheduler"], "resampler": resampler_config, "kv_encoder": configs["kv_encoder"],
                "pipeline": configs["pipeline"]}  # fmt: skip
    return assemble(parts, image_encoder, resampler, added, settings, files.get("lcm_lora"))


def assemble(
    parts: dict[str, Any], image_encoder: CLIPVisionModelWithProjection, resampler: IPAdapterPlusImageProjection,
    added: LookaheadWeights, settings: dict[str, Any], lcm_lora: Path | None = None,
) -> Components:  # fmt: skip
    """The last steps of loading a directory and of ``lcmla convert``: wire the shared UNet (``parts["unet"]``) with
    LCM-Lookahead's weights ``added``, attach the LCM-LoRA file ``lcm_lora``, and make the ``Personalizer.config``:
    the UNet's config plus ``settings`` (``scheduler``, ``resampler`` and ``kv_encoder`` configs, and ``pipeline``
    settings over :data:`PIPELINE_DEFAULTS`)."""
    unet = parts["unet"]
    wire_unet(unet, settings["kv_encoder"], added)
    if lcm_lora is not None:
        load_lcm_lora(unet, lcm_lora)
    config = {"unet": dict(unet.config), **settings, "pipeline": {**PIPELINE_DEFAULTS, **settings["pipeline"]}}
    return Components(config=config, image_encoder=image_encoder, resampler=resampler, **parts)


def load_sdxl(folder: Path, dtype: torch.dtype | None, variant: str | None = None, vae_dir: Path | None = None) -> dict[str, Any]:
    """The SDXL base parts of a diffusers-layout folder (local files only), by their ``Components`` names, in
    ``dtype`` (``None``: the dtype the UNet's weights are stored in)."""
    local = {"local_files_only": True}
    if dtype is None:
        header = file_header(weight_file(folder / "unet", DIFFUSERS_PARTS["unet"], variant))
        dtype = getattr(torch, next(iter(header.values()))[1])
    vae_config = AutoencoderKL.load_config(vae_dir or folder / "vae")
    vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet", variant=variant, torch_dtype=dtype, **local),
        "vae": AutoencoderKL.from_pretrained(
            vae_dir or folder / "vae", variant=None if vae_dir else variant, torch_dtype=vae_dtype, **local
        ),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", variant=variant, dtype=dtype, **local),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", variant=variant, dtype=dtype, **local
        ),
        "tokenizer": load_tokenizer(folder / "tokenizer"),
        "tokenizer_2": load_tokenizer(folder / "tokenizer_2"),
    }
