"""Building a model's modules from files that were checked: the SDXL base from its diffusers folders, the image
encoder, the adapter and LCM-Lookahead's weights, wired on the shared UNet once (:func:`assemble`, which
``lcmla convert`` ends with too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from ..presets import Components
from ..text import load_tokenizer
from ..weights import load_ip_adapter, load_lcm_lora, load_module_state, read_state_dict
from ..wiring import LookaheadWeights, wire_unet
from .format import DIFFUSERS_PARTS, ModelLayout, file_header, weight_file

# The authors' pipeline settings, for directories whose index does not name them.
PIPELINE_DEFAULTS = {"encoder_prompt": "A photo of a face", "face_size": 1024}


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
