"""SDXL-Turbo through diffusers: a local diffusers folder, or random weights of its architecture (``tiny``, ``sdxl``).

SDXL-Turbo is SDXL's architecture (UNet, VAE, two CLIP text encoders) with an Euler-ancestral scheduler on
"trailing" timesteps, run for 1 step without guidance. The presets take the UNet, VAE and text encoders' constructor
arguments from lcmla's presets of the same name (``tiny``: CPU-sized, makes noise; ``sdxl``: full size, for
benchmarks) and that scheduler; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoPipelineForText2Image,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import ModelFilesError
from ..integrity import sha256_json
from ..presets import PRESETS, drawn_on, preset_config, tiny_tokenizer

# stabilityai/sdxl-turbo's scheduler_config.json (the parts that differ from the class defaults included).
TURBO_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "trailing", "prediction_type": "epsilon",
}  # fmt: skip
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
FOLDER_HINT = "a diffusers SDXL-Turbo folder (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, " \
    "scheduler/)"


def load_turbo(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    vae: str | Path | None = None,
) -> StableDiffusionXLPipeline:
    """The pipeline from a local folder, or a preset name with random weights drawn from ``seed`` on ``device``.

    ``vae``: a local ``AutoencoderKL`` folder replacing the model's, e.g. the fp16-fix SDXL VAE, which decodes in
    fp16 where SDXL-Turbo's own VAE is upcast to fp32 (``force_upcast``) by the pipeline.
    """
    if str(source) in PRESETS:
        pipe = random_turbo(str(source), device, dtype, seed)
    else:
        folder = check_turbo_folder(source)
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype, variant=_variant(folder)
            ).to(device)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelFilesError(f"turbo: cannot load {folder}: {reason}") from None
    if vae is not None:
        try:
            pipe.vae = AutoencoderKL.from_pretrained(Path(vae), local_files_only=True, torch_dtype=dtype).to(device)
        except (OSError, ValueError) as error:
            raise ModelFilesError(f"vae: cannot load {vae}: {str(error).strip().splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_turbo(preset: str, device: str | torch.device, dtype: torch.dtype, seed: int) -> StableDiffusionXLPipeline:
    config = preset_config(preset)
    # Built outside the device context: the scheduler's tables go through numpy, which a CUDA default device breaks.
    scheduler = EulerAncestralDiscreteScheduler(**TURBO_SCHEDULER)
    with drawn_on(device, dtype, seed):
        tokenizer = tiny_tokenizer()
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**{**config["vae"], "force_upcast": True}),  # Turbo's own VAE, upcast as it asks
            text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=UNet2DConditionModel(**config["unet"]),
            scheduler=scheduler,
        )


def check_turbo_folder(source: str | Path) -> Path:
    """The folder, or a one-line :class:`ModelFilesError` saying what is missing or wrong."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelFilesError(f"turbo: {folder}: no such folder; expected {FOLDER_HINT} or a preset {PRESETS}")
    index = folder / "model_index.json"
    try:
        pipeline_class = json.loads(index.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ModelFilesError(f"turbo: {folder} has no model_index.json; expected {FOLDER_HINT}") from None
    except (OSError, ValueError, AttributeError) as error:
        raise ModelFilesError(f"turbo: {index} is not a readable pipeline index: {error}") from None
    if pipeline_class != StableDiffusionXLPipeline.__name__:
        raise ModelFilesError(
            f"turbo: {folder} holds a {pipeline_class} (model_index.json); expected SDXL-Turbo's "
            f"{StableDiffusionXLPipeline.__name__}"
        )
    missing = [part for part in PARTS if not (folder / part).is_dir()]
    if missing:
        raise ModelFilesError(f"turbo: {folder} lacks {', '.join(p + '/' for p in missing)}; expected {FOLDER_HINT}")
    return folder


def _variant(folder: Path) -> str | None:
    """``"fp16"`` for a folder holding only the fp16 weight files (how sdxl-turbo is often downloaded)."""
    unet = folder / "unet"
    plain = any(unet.glob("diffusion_pytorch_model.safetensors")) or any(unet.glob("diffusion_pytorch_model.bin"))
    return "fp16" if not plain and any(unet.glob("diffusion_pytorch_model.fp16.*")) else None


def turbo_fingerprint(source: str | Path, vae: str | Path | None = None) -> str:
    """What identifies the model in a run record: the preset's config, or the folder's index and configs (and the
    replacing VAE's config); weights are not hashed."""
    if str(source) in PRESETS:
        model = {"preset": str(source), "config": preset_config(str(source))}
    else:
        folder = Path(source).expanduser()
        configs = {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.glob("*/*config.json"))}
        model = {"model_index": (folder / "model_index.json").read_text(), "configs": configs}
    if vae is not None:
        model["vae"] = (Path(vae).expanduser() / "config.json").read_text()
    return sha256_json(model)[:16]
