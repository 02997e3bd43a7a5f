"""The ``lcmla`` command line.

Only typer and rich are imported here; each command imports what it needs (torch, diffusers, ...) when it runs, so
``lcmla --help`` and every ``--help`` answer at once.
"""

from __future__ import annotations

import json

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .defaults import AUTHORS_FREEU, DEFAULT_GUIDANCE, MODES

# Plain help (click's layout): switches show as switches, not with a "<bool>" value.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="LCM-Lookahead face personalization for SDXL."
)
console = Console(stderr=True)


# Set by --debug: errors then raise with their traceback instead of printing one line.
SETTINGS = {"debug": False}
FACES_HELP = (
    "Face backend: 'auto' (the model's insightface pack, else dlib), 'dlib[:cnn][,68]', 'insightface:DIR' or DIR, "
    "'none' (no detection)."
)
MODE_HELP = f"'quality' (DPM-Solver++, {MODES['quality']} steps) or 'fast' (LCM, {MODES['fast']} steps)."
DTYPES = ("float32", "bfloat16", "float16")  # names of the torch dtypes the SDK runs in (lcmla_sdk.validation.DTYPES)
# Errors a user can fix (bad arguments, bad or unreadable files); every LcmlaError derives from ValueError.
USER_ERRORS = (ValueError, TypeError, OSError)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    """LCM-Lookahead face personalization for SDXL."""
    SETTINGS["debug"] = debug


def fail(error: Exception) -> typer.Exit:
    """One clear line on stderr and exit code 2 (re-raised with its traceback under --debug)."""
    if SETTINGS["debug"]:
        raise error
    console.print(f"error: {error}", soft_wrap=True, highlight=False, markup=False)
    return typer.Exit(code=2)


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


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt; repeat for several."),
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
    guidance: tuple[float, float, float] = typer.Option(DEFAULT_GUIDANCE, help="Weights no_kv full kv."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
    no_kv: bool = typer.Option(
        False, "--no-kv", help="IP-Adapter only (plain CFG, scale no_kv + full); no-K/V models' default."
    ),
    adapter_scale: float = typer.Option(1.0, help="IP-Adapter strength."),
    kv_cache: bool = typer.Option(False, "--kv-cache", help="Reuse the identity's K/V (fixed reference noise)."),
    freeu: tuple[float, float, float, float] = typer.Option(AUTHORS_FREEU, help="FreeU b1 b2 s1 s2."),
    no_freeu: bool = typer.Option(False, "--no-freeu", help="Turn FreeU off."),
    vae: str = typer.Option("full", help="'full' or 'tiny' (needs --tiny-vae)."),
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

    from . import cli_checks, validation
    from .atomic import atomic_path
    from .decoding import VAES
    from .identity import Identity
    from .pipeline import Personalizer

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
        if validation.choice(vae, "vae", VAES) == "tiny" and tiny_vae is None:
            raise ValueError("vae: 'tiny' needs --tiny-vae DIR, a local AutoencoderTiny (TAESD-XL) folder")
        layout = cli_checks.model_layout(model)
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
                personalizer.warmup(mode, len(prompt) * num_images, height, width, use_kv=False if no_kv else None,
                                    kv_cache=kv_cache, steps=steps)  # fmt: skip
            console.print(f"warm-up: {time.perf_counter() - begin:.1f} s", highlight=False)
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


# --------------------------------------------------------------------------- export
@app.command()
def bench(
    preset: str = typer.Option("sdxl", help="Embedded preset whose random weights are timed ('sdxl': full size)."),
    size: int = typer.Option(1024, help="Image side in pixels."),
    batch: int = typer.Option(8, help="Batch of the throughput runs (fast mode)."),
    quality_steps: int = typer.Option(MODES["quality"], help="Steps of quality mode."),
    iters: int = typer.Option(3, help="Timed calls per run, after the first."),
    modes: str = typer.Option("fast,quality", help="Comma-separated modes."),
    ways: str = typer.Option("all", help="Comma-separated: authors, diffusers, eager, graphs, kv_cache, tiny_vae, "
                             "compiled, compiled_kv, compiled_tiny."),  # fmt: skip
    compiled: Optional[Path] = typer.Option(None, help="Folder of compiled networks for the compiled ways (`lcmla export "
                                            "--backend torch`); built there first when missing."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, help="Compare two result JSON files and stop."),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="Where the results go (JSON)."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the table as Markdown here."),
) -> None:
    """Time generation end to end: lcmla (eager, CUDA graphs, K/V cache, tiny VAE, compiled networks) against the
    authors' way and plain diffusers, in one process (run it on a GPU)."""
    from .bench import WAYS, BenchConfig, planned_runs, run_bench, table
    from .bench_compiled import compare as compare_runs

    try:
        if compare is not None:
            print(compare_runs(*(json.loads(path.read_text()) for path in compare)))
            return
        chosen = WAYS if ways == "all" else tuple(ways.split(","))
        config = BenchConfig(preset, size, batch, MODES["fast"], quality_steps, iters, tuple(modes.split(",")), chosen,
                             device, str(compiled) if compiled else None)  # fmt: skip
        unknown = set(config.ways) - set(WAYS)
        if unknown or not set(config.modes) <= {"fast", "quality"}:
            raise ValueError(f"ways/modes: unknown {sorted(unknown) or config.modes}")
        total = len(planned_runs(config))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:  # fmt: skip
            task = progress.add_task("bench", total=total)

            def report(line: str) -> None:
                progress.console.print(line, highlight=False, markup=False)
                if " b1:" in line:
                    progress.advance(task)

            results = run_bench(config, report, json_path)
    except (ValueError, OSError) as error:
        raise fail(error) from None
    text = table(results)
    print(text)
    if markdown is not None:
        markdown.write_text(text + "\n")
    console.print(f"wrote {json_path}")


@app.command()
def export(
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name ('tiny', 'sdxl')."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: engines/<model name>)."),
    fp16: bool = typer.Option(False, "--fp16", help="Export fp16 graphs and build fp16 engines."),
    onnx_only: bool = typer.Option(False, "--onnx-only", help="Stop after the ONNX graphs and manifest."),
    batch: str = typer.Option("1:1:4", help="Images per call, MIN:OPT:MAX (UNet graphs get twice that for CFG)."),
    references: str = typer.Option("1:1:1", help="Reference photos per identity, MIN:OPT:MAX (the K/V grow with them)."),
    height: Optional[str] = typer.Option(None, help="Image height range in pixels, MIN:OPT:MAX."),
    width: Optional[str] = typer.Option(None, help="Image width range in pixels, MIN:OPT:MAX."),
    static: Optional[tuple[int, int]] = typer.Option(None, help="Static image size H W (instead of ranges)."),
    check: bool = typer.Option(False, "--check", help="Check every graph against PyTorch with onnxruntime."),
    networks: Optional[str] = typer.Option(None, help="Comma-separated subset of networks to export."),
    opt_level: int = typer.Option(3, help="TensorRT builder optimisation level 0..5."),
    device: Optional[str] = typer.Option(None, help="Device to trace on (default: cuda if available)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
    backend: str = typer.Option("tensorrt", help="'tensorrt': ONNX graphs, then engines when TensorRT is installed; "
                                "'torch': networks compiled by torch.compile for --shapes (on this GPU)."),
    shapes: str = typer.Option("fast:1,fast:8,quality:1", help="With --backend torch: MODE:IMAGES[:HxW], comma-separated "
                               "(size: the model's default)."),
    jobs: int = typer.Option(4, help="With --backend torch: build processes at once."),
) -> None:
    """Export ONNX graphs (and TensorRT engines when TensorRT is installed) of every network, or build compiled
    networks (--backend torch)."""
    import torch

    from . import validation

    if backend == "torch":
        return _export_compiled(model, out, shapes, device, jobs)
    if backend != "tensorrt":
        raise fail(ValueError(f"backend: expected 'tensorrt' or 'torch', got {backend!r}"))
    from .engines import BuildOptions, TensorRTUnavailable, build_engines
    from .export import ShapeRanges, export_model, parse_range
    from .pipeline import Personalizer

    try:
        if static is not None and (height or width):
            raise ValueError("static: give either --static H W or --height/--width ranges, not both")
        validation.device(device)
        options = BuildOptions("fp16" if fp16 else "fp32", opt_level)  # checked before the export, not after
        loaded = Personalizer.from_pretrained(
            model, device=device, dtype=torch.float16 if fp16 else torch.float32, verify=not no_verify
        )
        size = loaded.default_size
        heights = (static[0],) * 3 if static else parse_range(height or str(size), "height")
        widths = (static[1],) * 3 if static else parse_range(width or str(size), "width")
        for name, values in (("height", heights), ("width", widths)):
            if any(v % loaded.size_multiple for v in values):
                raise ValueError(f"{name}: {values} must be multiples of {loaded.size_multiple}")
        ranges = ShapeRanges(parse_range(batch, "batch"), heights, widths, parse_range(references, "references"))
        folder = out if out is not None else Path("engines") / Path(model).name
        report = export_model(
            loaded, folder, ranges, networks.split(",") if networks else None, check, log=console.print
        )
    except USER_ERRORS as error:
        raise fail(error) from None
    typer.echo(str(folder / "manifest.json"))
    if report.failed_parity:
        console.print(f"[red]parity check failed:[/red] {', '.join(report.failed_parity)}")
        raise typer.Exit(code=1)
    if onnx_only:
        return
    try:
        build_engines(folder, options, log=console.print)
    except TensorRTUnavailable as error:
        console.print(f"[red]error:[/red] ONNX graphs written to {folder}, but no engines: {escape(str(error))}")
        raise typer.Exit(code=3) from None


def _export_compiled(model: str, out: Optional[Path], shapes: str, device: Optional[str], jobs: int) -> None:
    from . import validation
    from .engines.compiled import build_compiled, parse_shapes

    try:
        validation.device(device)
        folder = out if out is not None else Path("engines") / f"{Path(model).name}-compiled"
        build_compiled(model, folder, parse_shapes(shapes), device or "cuda", jobs, log=console.print)
    except USER_ERRORS as error:
        raise fail(error) from None
    typer.echo(str(folder / "compiled.json"))


# ---------------------------------------------------------------------------- evaluation
@app.command("eval")
def evaluate(
    faces: Path = typer.Option(..., "--faces", help="Folder of input face photos (one person each)."),
    out: Path = typer.Option(..., help="Evaluation folder; a run continues what an earlier one left there."),
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file, one per line (default: the list shipped with lcmla)."),
    modes: str = typer.Option("quality,fast,nokv", help="Comma-separated: quality, fast, nokv (quality without K/V)."),
    seeds: int = typer.Option(1, help="Seeds per face and prompt: 0 .. N-1."),
    recognizer: list[str] = typer.Option(["dlib"], help="Face recognizer for ID: 'dlib[:cnn][,68]' or 'insightface:DIR'; repeat to add one."),
    clip: Optional[Path] = typer.Option(None, help="Local CLIP folder (transformers CLIPModel + tokenizer) for CLIP-T/CLIP-I."),
    label: Optional[str] = typer.Option(None, help="Method name in the table (default: the model's name)."),
    steps: Optional[int] = typer.Option(None, help="Number of steps (default: by mode)."),
    height: Optional[int] = typer.Option(None),
    width: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
) -> None:
    """Generate each face x prompt x seed x mode, then score ID similarity, CLIP-T and CLIP-I (docs/EVALUATION.md)."""
    from . import evaluation
    from .pipeline import Personalizer

    try:
        plan = evaluation.EvalPlan(
            faces=evaluation.find_faces(faces),
            prompts=evaluation.read_prompts(prompts) if prompts else evaluation.default_prompts(),
            seeds=list(range(seeds)), modes=[m.strip() for m in modes.split(",") if m.strip()],
            steps=steps, height=height, width=width,
        )  # fmt: skip
        with console.status(f"Loading {model} and the scorers..."):
            personalizer = Personalizer.from_pretrained(model, device=device)
            cuda = personalizer.device.type == "cuda"
            recognizers = evaluation.make_recognizers(
                recognizer, ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
            )
            scorer = evaluation.ClipScorer(clip, personalizer.device) if clip is not None else None
            references = evaluation.reference_embeddings(plan, recognizers)  # every input photo shows a face
        with Progress(
            TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[skipped]} kept"),
            TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("generate", total=len(plan.jobs()), skipped=0)

            def on_image(job, skipped: bool) -> None:
                kept = progress.tasks[task].fields["skipped"] + int(skipped)
                progress.update(task, advance=1, skipped=kept)

            evaluation.evaluate(
                personalizer, plan, out, label or Path(model).name, recognizers, scorer, on_image, console.print,
                references,
            )
    except USER_ERRORS as error:
        raise fail(error) from None
    except KeyboardInterrupt:
        message = f"interrupted: finished images are kept in {out}; run the same command again to continue"
        console.print(message, soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(code=130) from None
    typer.echo((out / "table.md").read_text(), nl=False)


# ---------------------------------------------------------------------------- training
# The trainer lives in lcmla_sdk.train (accelerate, tensorboard, pyyaml: the [train] extra); it is imported inside
# the command so that generating never needs it.


@app.command()
def train(
    config: Path = typer.Option(..., "--config", help="Training YAML (docs/TRAINING.md lists every key)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key.path=value, e.g. max_steps=100."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint directory."),
) -> None:
    """Train the KV-encoder and image adapter with the LCM-Lookahead losses (through accelerate)."""
    try:
        from .train import Trainer, load_config
    except ImportError as error:
        console.print(f"[red]error:[/red] {escape(f'training needs the [train] extra (pip install lcmla[train]): {error}')}")
        raise typer.Exit(code=2) from None
    try:
        trainer = Trainer(load_config(config, overrides or []))
        result = trainer.train(resume=resume_from if resume_from is not None else resume)
    except USER_ERRORS as error:  # config, data, checkpoint and weight errors are ValueErrors; unreadable files OSErrors
        raise fail(error) from None
    if trainer.accelerator.is_main_process:
        typer.echo(f"trained to step {result['step']}; checkpoints in {Path(trainer.output_dir) / 'checkpoints'}")


# ------------------------------------------------------------------ model files, identities, conversion (issue 3)
identity_app = typer.Typer(no_args_is_help=True, help="Encode faces once into reusable identity files.")
app.add_typer(identity_app, name="identity")


@identity_app.command("create")
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
    from . import cli_checks, validation
    from .faces import ON_MULTIPLE
    from .images import FACE_RESIZES
    from .pipeline import CROPS, Personalizer

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


HUB_HELP = " A local path, or hf://OWNER/NAME[/PATH] to fetch from the Hugging Face Hub (cached; docs/WEIGHTS.md)."


@app.command()
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

    from . import validation
    from .convert import convert as run_convert
    from .hub import fetch
    from .schema import read_json

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


@app.command()
def info(
    model: Path = typer.Argument(..., help="lcmla model directory."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the files against lcmla.json."),
) -> None:
    """List a model directory's components (path, dtypes, size) and whether its files pass validation (and their
    recorded sha256)."""
    from . import model_dir

    try:
        rows = model_dir.describe(model)
        for name, path, dtypes, size in rows:
            typer.echo(f"{name:14s} {dtypes:18s} {size:>12s}  {path}")
        layout = model_dir.validate(model, verify=not no_verify)
        typer.echo(f"valid; fingerprint {layout.fingerprint()}")
    except USER_ERRORS as error:
        raise fail(error) from None


@app.command()
def demo(
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name ('tiny', 'sdxl')."),
    server: Optional[str] = typer.Option(None, help="URL of an `lcmla serve` service to use instead of a model."),
    host: str = typer.Option("127.0.0.1", help="Address to serve the page on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port of the page."),
    faces: str = typer.Option("auto", help=FACES_HELP),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
) -> None:
    """Open the web app (Gradio; the `demo` extra): photos in, a gallery out."""
    from . import validation

    try:
        validation.device(device)
        validation.integer(port, "port", 1, 65535)
        if server is not None and not server.startswith(("http://", "https://")):
            raise ValueError(f"server: expected an http:// or https:// URL, got {server!r}")
        try:
            from .demo.app import launch
        except ImportError as error:
            raise ValueError(f"demo: needs Gradio ({error}); install it with: pip install 'lcmla[demo]'") from None
        console.print(f"lcmla demo on http://{host}:{port} (Ctrl-C stops it)", highlight=False)
        launch(model, server, host, port, device, faces, open_browser)
    except USER_ERRORS as error:
        raise fail(error) from None


if __name__ == "__main__":
    app()
