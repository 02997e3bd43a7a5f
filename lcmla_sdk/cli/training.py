"""Measuring and training the method: ``lcmla eval``, ``lcmla train`` and the synthetic data (``lcmla data``).

The trainer lives in lcmla_sdk.train (accelerate, tensorboard, pyyaml: the [train] extra); it is imported inside
the command so that generating never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import USER_ERRORS, console, fail


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
    from .. import evaluation
    from ..pipeline import Personalizer

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


def train(
    config: Path = typer.Option(..., "--config", help="Training YAML (docs/TRAINING.md lists every key)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key.path=value, e.g. max_steps=100."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint directory."),
) -> None:
    """Train the KV-encoder and image adapter with the LCM-Lookahead losses (through accelerate)."""
    try:
        from ..train import Trainer, load_config
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


def data_generate(
    turbo: str = typer.Option(..., help="SDXL-Turbo diffusers folder, or 'tiny' / 'sdxl' (random weights)."),
    identities: str = typer.Option(..., help="Number of generated descriptions, or a .txt/.csv/.jsonl list."),
    out: Path = typer.Option(..., help="Set folder; a run continues what an earlier one left there."),
    per_identity: int = typer.Option(5, help="Photos (vanilla/) per identity (the authors: 40)."),
    per_style: int = typer.Option(1, help="Images per style (stylized/) per identity (the authors: 8)."),
    styles: str = typer.Option("all", help="Comma-separated among graffiti,pencil,watercolor,comic,oil; or 'none'."),
    size: int = typer.Option(512, help="Image side in pixels."),
    consistent: str = typer.Option("none", help="'none' (the authors'), 'attention', 'filter' or 'attention,filter'."),
    anchors: int = typer.Option(2, help="Attention mode: photos every other image of the identity attends to."),
    faces: Optional[str] = typer.Option(None, help="Face backend that measures identities ('dlib' with the filter)."),
    threshold: float = typer.Option(0.92, help="Filter: least mean cosine of a photo to its identity's others."),
    seed: int = typer.Option(0, help="Seed of the descriptions and of every image's seed."),
    shard: Optional[str] = typer.Option(None, help="I/N: this process makes identities I, I+N, ...; 'auto': from RANK/WORLD_SIZE."),
    batch_size: int = typer.Option(8, help="Images per pipeline call."),
    writers: int = typer.Option(4, help="Threads checking faces and writing files."),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    vae: Optional[Path] = typer.Option(None, help="Local VAE folder replacing Turbo's (the fp16-fix VAE decodes in fp16)."),
) -> None:
    """Generate identities x (photos + styles) in the authors' layout, with metadata.json and summary.json."""
    from diffusers.utils import logging as diffusers_logging

    from ..data.command import GenerateArgs, run_generate, summary_text

    diffusers_logging.set_verbosity_error()  # per-call notes (e.g. prompt truncation) would break the progress bar
    try:
        args = GenerateArgs(turbo, identities, out, per_identity, per_style, styles, size, consistent, anchors, faces,
                            threshold, seed, shard, batch_size, writers, device, vae)  # fmt: skip
        summary = run_generate(args, console)
    except USER_ERRORS as error:
        raise fail(error) from None
    except KeyboardInterrupt:
        console.print(f"interrupted: finished identities are kept in {out}; run the same command again to continue",
                      soft_wrap=True, highlight=False, markup=False)  # fmt: skip
        raise typer.Exit(code=130) from None
    typer.echo(summary_text(summary))


def data_merge(out: Path = typer.Argument(..., help="Set folder whose shards/ are all complete.")) -> None:
    """Join the shards' metadata into metadata.json and summary.json."""
    from ..data.command import summary_text
    from ..data.layout import merge_shards

    try:
        typer.echo(summary_text(merge_shards(out)))
    except USER_ERRORS as error:
        raise fail(error) from None
