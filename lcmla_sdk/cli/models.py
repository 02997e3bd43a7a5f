"""Model directories: ``lcmla convert`` (the authors' weights into one) and ``lcmla info`` (what one holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DTYPES, HUB_HELP, USER_ERRORS, console, fail


def convert(
    out: Path = typer.Option(..., help="lcmla model directory to write."),
    sdxl: str = typer.Option(..., help="SDXL base in diffusers layout (unet, vae, text encoders, tokenizers)." + HUB_HELP),
    image_encoder: str = typer.Option(..., help="CLIP ViT-H image encoder folder (config.json; + weights without --checkpoint)." + HUB_HELP),
    checkpoint: Optional[str] = typer.Option(None, help="The authors' encoder_plus_adapter_ckpt.bin (or _no_kv), or a folder of their files." + HUB_HELP),
    ip_adapter: Optional[str] = typer.Option(None, help="Without --checkpoint: ip-adapter-plus-face_sdxl_vit-h (.bin/.safetensors)." + HUB_HELP),
    lcm_lora: Optional[str] = typer.Option(None, help="SDXL LCM-LoRA file (enables --mode fast)." + HUB_HELP),
    vae: Optional[str] = typer.Option(None, help="The fp16-fix SDXL VAE folder (the authors' VAE; replaces SDXL's)." + HUB_HELP),
    faces: Optional[Path] = typer.Option(None, help="insightface pack folder to copy in (det + ArcFace ONNX)."),
    fuse_kv_lora: bool = typer.Option(False, "--fuse-kv-lora", help="Fuse the K/V projections' LoRA into their weights."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16, bfloat16 or float32."),
    variant: Optional[str] = typer.Option(None, help="Weight variant of the SDXL files, e.g. fp16."),
    kv_encoder: Optional[bool] = typer.Option(
        None, "--kv-encoder/--no-kv-encoder", help="Is the checkpoint's K/V-encoder trained? (default: not for *no_kv*)"
    ),
) -> None:
    """Convert the authors' weights (or SDXL + IP-Adapter) into an lcmla model directory."""
    import torch

    from .. import validation
    from ..convert import convert as run_convert
    from ..hub import fetch
    from ..schema import read_json

    try:
        validation.choice(dtype, "dtype", DTYPES)
        named = {"checkpoint": checkpoint, "ip_adapter": ip_adapter, "lcm_lora": lcm_lora, "vae": vae}
        local = {key: fetch(value, f"--{key.replace('_', '-')}") for key, value in named.items() if value is not None}
        counts = run_convert(
            out, fetch(sdxl, "--sdxl", sdxl=True, variant=variant), fetch(image_encoder, "--image-encoder"), **local,
            faces=faces, fuse_kv_lora=fuse_kv_lora, dtype=getattr(torch, dtype), variant=variant, kv_encoder=kv_encoder,
        )  # fmt: skip
    except USER_ERRORS as error:
        raise fail(error) from None
    for what, count in counts.items():
        typer.echo(f"{count:6d}  {what}")
    if read_json(out / "sdxl" / "vae" / "config.json").get("force_upcast", True):
        console.print(
            "note: this VAE decodes in float32 (force_upcast); the authors decode with the fp16-fix SDXL VAE in "
            "float16: pass its folder as --vae", highlight=False, soft_wrap=True,
        )  # fmt: skip
    typer.echo(str(out))


def info(
    model: Path = typer.Argument(..., help="lcmla model directory."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the files against lcmla.json."),
) -> None:
    """List a model directory's components (path, dtypes, size) and whether its files pass validation (and their
    recorded sha256)."""
    from .. import model_dir

    try:
        rows = model_dir.describe(model)
        for name, path, dtypes, size in rows:
            typer.echo(f"{name:14s} {dtypes:18s} {size:>12s}  {path}")
        layout = model_dir.validate(model, verify=not no_verify)
        typer.echo(f"valid; fingerprint {layout.fingerprint()}")
    except USER_ERRORS as error:
        raise fail(error) from None
