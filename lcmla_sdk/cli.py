"""The ``lcmla`` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .freeu import AUTHORS_FREEU
from .guidance import DEFAULT_GUIDANCE
from .request import MODES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LCM-Lookahead face personalization for SDXL.")
console = Console(stderr=True)


# Set by --debug: errors then raise with their traceback instead of printing one line.
SETTINGS = {"debug": False}
FACES_HELP = (
    "Face backend: 'auto' (the model's insightface pack, else dlib), 'dlib[:cnn][,68]', 'insightface:DIR' or DIR, "
    "'none' (no detection)."
)
MODE_HELP = f"'quality' (DPM-Solver++, {MODES['quality']} steps) or 'fast' (LCM, {MODES['fast']} steps)."
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


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt; repeat for several."),
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name ('tiny', 'sdxl')."),
    face: Optional[Path] = typer.Option(None, help="Face image; default: the sample face shipped with lcmla."),
    identity: Optional[Path] = typer.Option(None, help="Identity file from `lcmla identity create` (skips face work)."),
    out: Path = typer.Option(Path("outputs"), help="Folder for the PNG files."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt (default: none, zeroed)."),
    num_images: int = typer.Option(1, help="Images per prompt."),
    seed: Optional[int] = typer.Option(None, help="Seed of the first image; the next ones use seed+1, ..."),
    mode: str = typer.Option("quality", help=MODE_HELP),
    steps: Optional[int] = typer.Option(None, help="Number of steps (default: by mode)."),
    guidance: tuple[float, float, float] = typer.Option(DEFAULT_GUIDANCE, help="Weights no_kv full kv."),
    height: Optional[int] = typer.Option(None),
    width: Optional[int] = typer.Option(None),
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
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
) -> None:
    """Generate images of the person in FACE."""
    from . import validation
    from .atomic import atomic_path
    from .images import sample_face
    from .pipeline import Personalizer

    try:
        # Everything that does not need the model is checked before minutes of loading, not after.
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} is a file, not a folder")
        validation.device(device)
        validation.steps(steps, validation.choice(mode, "mode", tuple(MODES)), MODES[mode])
        validation.seeds(seed, len(prompt) * validation.integer(num_images, "num_images", 1))
        validation.guidance(guidance)
        validation.number(adapter_scale, "adapter_scale", 0.0, validation.MAX_WEIGHT)
        for name, side in (("height", height), ("width", width)):
            validation.image_side(side, name, 0, 1)
        with console.status(f"Loading {model}..."):
            personalizer = Personalizer.from_pretrained(model, device=device, faces=faces, tiny_vae=tiny_vae,
                                                        verify=not no_verify)  # fmt: skip
        face_input = personalizer.load_identity(identity) if identity else face if face is not None else sample_face()
        if warmup:
            with console.status("Capturing the sampling step..."):
                begin = time.perf_counter()
                personalizer.warmup(mode, len(prompt) * num_images, height, width, use_kv=False if no_kv else None,
                                    kv_cache=kv_cache, steps=steps)  # fmt: skip
            console.print(f"warm-up: {time.perf_counter() - begin:.1f} s", highlight=False)
        with Progress(
            TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("denoise", total=None)

            def on_step(index: int, timestep: int, latents) -> None:
                progress.update(task, completed=index + 1)

            total = steps if steps is not None else MODES.get(mode)
            progress.update(task, total=total)
            images = personalizer.generate(
                face_input, prompt, negative_prompt=negative_prompt, num_images=num_images, seed=seed, mode=mode,
                steps=steps, guidance=guidance, height=height, width=width, use_kv=False if no_kv else None,
                adapter_scale=adapter_scale, callback=on_step, kv_cache=kv_cache, vae=vae,
                freeu=None if no_freeu else freeu,
            )  # fmt: skip
        for index, image in enumerate(images):
            path = out / f"{index:03d}.png"
            with atomic_path(path) as temporary:  # a full disk leaves the previous image, not a truncated one
                image.save(temporary, format="PNG")
            typer.echo(str(path))
    except USER_ERRORS as error:
        raise fail(error) from None


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
                             "compiled, compiled_kv."),  # fmt: skip
    compile_cache: Optional[Path] = typer.Option(None, help="File that keeps torch.compile's artefacts across runs."),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="Where the results go (JSON)."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the table as Markdown here."),
) -> None:
    """Time generation end to end: lcmla (eager, CUDA graphs, K/V cache, tiny VAE) against the authors' way and
    plain diffusers, in one process (run it on a GPU)."""
    from .bench import WAYS, BenchConfig, planned_runs, run_bench, table

    try:
        chosen = WAYS if ways == "all" else tuple(ways.split(","))
        config = BenchConfig(preset, size, batch, MODES["fast"], quality_steps, iters, tuple(modes.split(",")), chosen,
                             device, str(compile_cache) if compile_cache else None)  # fmt: skip
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
    backend: str = typer.Option("tensorrt", help="Engine builder: tensorrt (built on this GPU) or tensorrt-rtx "
                                "(TensorRT for RTX: built without a GPU, runs on compute capability 8.0, 8.6, 8.9, 12.x)."),
    compute_capability: Optional[list[str]] = typer.Option(
        None, help="tensorrt-rtx only: a compute capability to compile for (repeat; default 8.0 8.6 8.9 12.0 12.1; "
        "7.5 for Turing)."),
    device: Optional[str] = typer.Option(None, help="Device to trace on (default: cuda if available)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
) -> None:
    """Export ONNX graphs (and TensorRT or TensorRT-RTX engines when it is installed) of every network."""
    import torch

    from . import validation
    from .engines import BACKENDS, BuildOptions, TensorRTRTX, TensorRTUnavailable, build_engines
    from .export import ShapeRanges, export_model, parse_range
    from .pipeline import Personalizer

    try:
        if static is not None and (height or width):
            raise ValueError("static: give either --static H W or --height/--width ranges, not both")
        validation.device(device)
        options = BuildOptions("fp16" if fp16 else "fp32", opt_level)  # checked before the export, not after
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not one of {tuple(BACKENDS)}")
        if compute_capability and backend != "tensorrt-rtx":
            raise ValueError("compute-capability: only for --backend tensorrt-rtx (TensorRT builds for this GPU)")
        builder = TensorRTRTX(tuple(compute_capability)) if compute_capability else BACKENDS[backend]()
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
        build_engines(folder, options, log=console.print, backend=builder)
    except TensorRTUnavailable as error:
        console.print(f"[red]error:[/red] ONNX graphs written to {folder}, but no engines: {escape(str(error))}")
        raise typer.Exit(code=3) from None
    except (*USER_ERRORS, RuntimeError) as error:  # a graph the builder rejects, I/O unlike the manifest's
        raise fail(error) from None


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
    face: list[Path] = typer.Option(..., "--face", help="Photo of the person; repeat for several (combined)."),
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
    from . import validation
    from .face_analyzer import ON_MULTIPLE
    from .images import FACE_RESIZES
    from .pipeline import CROPS, Personalizer

    try:
        validation.device(device)
        validation.choice(crop, "crop", CROPS)
        validation.choice(on_multiple, "on_multiple", ON_MULTIPLE)
        validation.choice(face_resize, "face_resize", FACE_RESIZES)
        if out.is_dir():
            raise ValueError(f"out: {out} is a folder; name the identity file to write")
        personalizer = Personalizer.from_pretrained(model, device=device, faces=faces, verify=not no_verify)
        identity = personalizer.encode_face(face, crop=crop, on_multiple=on_multiple, face_resize=face_resize)
        typer.echo(str(identity.save(out)))
    except USER_ERRORS as error:
        raise fail(error) from None


@app.command()
def convert(
    out: Path = typer.Option(..., help="lcmla model directory to write."),
    sdxl: Path = typer.Option(..., help="SDXL base in diffusers layout (unet, vae, text encoders, tokenizers)."),
    image_encoder: Path = typer.Option(..., help="CLIP ViT-H image encoder folder (config.json; + weights without --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The authors' encoder_plus_adapter_ckpt.bin (or _no_kv), or a folder of their files."),
    ip_adapter: Optional[Path] = typer.Option(None, help="Without --checkpoint: ip-adapter-plus-face_sdxl_vit-h (.bin/.safetensors)."),
    lcm_lora: Optional[Path] = typer.Option(None, help="SDXL LCM-LoRA file (enables --mode fast)."),
    vae: Optional[Path] = typer.Option(None, help="The fp16-fix SDXL VAE folder (the authors' VAE; replaces SDXL's)."),
    faces: Optional[Path] = typer.Option(None, help="insightface pack folder to copy in (det + ArcFace ONNX)."),
    fuse_kv_lora: bool = typer.Option(False, help="Fuse the K/V projections' LoRA into their weights."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16, bfloat16 or float32."),
    variant: Optional[str] = typer.Option(None, help="Weight variant of the SDXL files, e.g. fp16."),
    kv_encoder: Optional[bool] = typer.Option(
        None, "--kv-encoder/--no-kv-encoder", help="Is the checkpoint's K/V-encoder trained? (default: not for *no_kv*)"
    ),
) -> None:
    """Convert the authors' weights (or SDXL + IP-Adapter) into an lcmla model directory."""
    import torch

    from .convert import convert as run_convert
    from .schema import read_json

    try:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype: {dtype!r} is not one of float16, bfloat16, float32")
        counts = run_convert(
            out, sdxl, image_encoder, checkpoint=checkpoint, ip_adapter=ip_adapter, lcm_lora=lcm_lora, vae=vae,
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


if __name__ == "__main__":
    app()
