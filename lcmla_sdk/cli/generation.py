"""Images of a person: ``lcmla generate``, and ``lcmla identity create`` (faces encoded once, for reuse)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..defaults import AUTHORS_FREEU, DEFAULT_GUIDANCE, MODES
from .common import DTYPES, FACES_HELP, MODE_HELP, USER_ERRORS, console, fail


class StepBar:
    """The denoising bar, drawn from the first finished step on: nothing shows before the work starts, so an error
    of the face or prompt checks inside ``generate`` prints alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.progress = Progress(
            TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task: int | None = None

    def __call__(self, index: int, timestep: int, latents) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("denoise", total=self.total)
        self.progress.update(self.task, completed=index + 1)

    def close(self) -> None:
        if self.task is not None:  # stopping a bar that never started would still print a blank line
            self.progress.stop()


def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", metavar="TEXT", help="Prompt; repeat for several."),
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name ('tiny', 'sdxl')."),
    face: Optional[str] = typer.Option(None, help="Face image, or 'sample' (the face shipped with lcmla; the default)."),
    identity: Optional[Path] = typer.Option(None, help="Identity file from `lcmla identity create` (skips face work)."),
    out: Path = typer.Option(Path("outputs"), help="Folder for the PNG files."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start again at 000.png (default: number on after the images already in --out)."
    ),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt (default: none, zeroed)."),
    num_images: int = typer.Option(1, help="Images per prompt."),
    seed: Optional[int] = typer.Option(None, help="Seed of the first image; the next ones use seed+1, ..."),
    mode: str = typer.Option("quality", help=MODE_HELP),
    steps: Optional[int] = typer.Option(None, help="Number of steps (default: by mode)."),
    guidance: tuple[float, float, float] = typer.Option(DEFAULT_GUIDANCE, metavar="NO_KV FULL KV",
                                                        help="Guidance weights, three numbers apart."),  # fmt: skip
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
    no_kv: bool = typer.Option(
        False, "--no-kv", help="IP-Adapter only (plain CFG, scale no_kv + full); no-K/V models' default."
    ),
    adapter_scale: float = typer.Option(1.0, help="IP-Adapter strength."),
    kv_cache: bool = typer.Option(False, "--kv-cache", help="Reuse the identity's K/V (fixed reference noise)."),
    freeu: tuple[float, float, float, float] = typer.Option(AUTHORS_FREEU, metavar="B1 B2 S1 S2",
                                                            help="FreeU's four values, apart."),  # fmt: skip
    no_freeu: bool = typer.Option(False, "--no-freeu", help="Turn FreeU off."),
    vae: str = typer.Option("full", help="'full' or 'tiny' (the model's own tiny VAE, or --tiny-vae)."),
    tiny_vae: Optional[Path] = typer.Option(None, help="Local AutoencoderTiny (TAESD-XL) folder."),
    warmup: bool = typer.Option(False, "--warmup", help="Capture the sampling step first and say how long it took."),
    faces: str = typer.Option("auto", help=FACES_HELP),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16 (default: float16 on a GPU, float32 on a CPU; docs/CPU.md)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
) -> None:
    """Generate images of the person in FACE (new files in --out; earlier images are kept)."""
    import torch

    from .. import cli_checks, validation
    from ..atomic import atomic_path
    from ..decoding import VAES
    from ..identity import Identity
    from ..pipeline import Personalizer

    try:
        # Everything that does not need the model is checked before minutes of loading, not after.
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} is a file, not a folder")
        if face is not None and identity is not None:
            raise ValueError("face: give --face or --identity, not both")
        validation.device(device)
        if dtype is not None:
            validation.choice(dtype, "dtype", DTYPES)
        validation.strings(prompt, "prompt")
        if negative_prompt is not None:
            validation.strings(negative_prompt, "negative_prompt")
        validation.steps(steps, validation.choice(mode, "mode", tuple(MODES)), MODES[mode])
        validation.seeds(seed, len(prompt) * validation.integer(num_images, "num_images", 1))
        validation.guidance(guidance)
        validation.number(adapter_scale, "adapter_scale", 0.0, validation.MAX_WEIGHT)
        validation.freeu(freeu)
        for name, side in (("height", height), ("width", width)):
            validation.image_side(side, name, 0, 1)
        layout = cli_checks.model_layout(model)
        tiny_missing = tiny_vae is None and not cli_checks.has_tiny_vae(model, layout)
        if validation.choice(vae, "vae", VAES) == "tiny" and tiny_missing:
            raise ValueError(
                f"vae: 'tiny' needs --tiny-vae DIR, a local AutoencoderTiny (TAESD-XL) folder: {model} has no tiny VAE"
            )
        multiple = cli_checks.size_multiple(model, layout)  # the model's size step, from its configs
        for name, side in (("height", height), ("width", width)):
            validation.image_side(side, name, 0, multiple)
        face_input = Identity.load(identity) if identity else cli_checks.face_photo(face, faces, layout)
        with console.status(f"Loading {model}..."):
            personalizer = Personalizer.from_pretrained(
                model, device=device, dtype=getattr(torch, dtype) if dtype else None, faces=faces, tiny_vae=tiny_vae,
                verify=not no_verify,
            )  # fmt: skip
        if identity:
            face_input.check_model(personalizer.fingerprint)
        if warmup:
            with console.status("Capturing the sampling step..."):
                begin = time.perf_counter()
                captured = personalizer.warmup(mode, len(prompt) * num_images, height, width, kv_cache=kv_cache,
                                               use_kv=False if no_kv else None, steps=steps)  # fmt: skip
            console.print(f"warm-up: {time.perf_counter() - begin:.1f} s" if captured else
                          "warm-up: nothing to capture (CUDA graphs are for a CUDA device; the loop runs eagerly here)",
                          highlight=False)  # fmt: skip
        bar = StepBar(steps if steps is not None else MODES[mode])
        try:
            images = personalizer.generate(
                face_input, prompt, negative_prompt=negative_prompt, num_images=num_images, seed=seed, mode=mode,
                steps=steps, guidance=guidance, height=height, width=width, use_kv=False if no_kv else None,
                adapter_scale=adapter_scale, callback=bar, kv_cache=kv_cache, vae=vae,
                freeu=None if no_freeu else freeu,
            )  # fmt: skip
        finally:
            bar.close()
        paths = cli_checks.image_paths(out, len(images), overwrite)
        for image, path in zip(images, paths):
            with atomic_path(path) as temporary:  # a full disk leaves the previous image, not a truncated one
                image.save(temporary, format="PNG")
    except USER_ERRORS as error:
        raise fail(error) from None
    for path in paths:
        typer.echo(str(path))


def identity_create(
    face: list[str] = typer.Option(
        ..., "--face", help="Photo of the person, or 'sample' (the face shipped with lcmla); repeat for several (combined)."
    ),
    out: Path = typer.Option(..., help="Identity file to write (.safetensors)."),
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name."),
    faces: str = typer.Option("auto", help=FACES_HELP),
    crop: str = typer.Option("none", help="'none' (the photo) or 'face' (aligned face crop)."),
    face_resize: str = typer.Option("squash", help="'squash' (whole photo, as the authors) or 'crop' (centre square)."),
    on_multiple: str = typer.Option("largest", help="'largest' face, or 'error' when a photo shows several."),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
) -> None:
    """Encode FACE photo(s) with MODEL into an identity file for `lcmla generate --identity`."""
    from .. import cli_checks, validation
    from ..faces import ON_MULTIPLE
    from ..images import CROPS, FACE_RESIZES
    from ..pipeline import Personalizer

    try:
        # As in generate: the photos are read and their faces found before the model loads.
        validation.device(device)
        validation.choice(crop, "crop", CROPS)
        validation.choice(on_multiple, "on_multiple", ON_MULTIPLE)
        validation.choice(face_resize, "face_resize", FACE_RESIZES)
        if out.is_dir():
            raise ValueError(f"out: {out} is a folder; name the identity file to write")
        layout = cli_checks.model_layout(model)
        photos = [cli_checks.face_photo(f, faces, layout, on_multiple) for f in face]
        personalizer = Personalizer.from_pretrained(model, device=device, faces=faces, verify=not no_verify)
        identity = personalizer.encode_face(photos, crop=crop, on_multiple=on_multiple, face_resize=face_resize)
        typer.echo(str(identity.save(out)))
    except USER_ERRORS as error:
        raise fail(error) from None
