"""``lcmla data generate`` and ``lcmla data merge``: arguments to a run, with a progress bar and a printed summary."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import validation
from .descriptions import generated_identities, read_identities
from .generate import SetGenerator
from .layout import prepare_output, run_record
from .plan import STYLES, PlanOptions, Shard
from ..presets import PRESETS
from .turbo import check_turbo_folder, load_turbo, turbo_fingerprint

BYTES_PER_PIXEL = 0.35  # a 512^2 JPEG at quality 95 of a photo: about 90 kB


@dataclass
class GenerateArgs:
    turbo: str
    identities: str
    out: Path
    per_identity: int
    per_style: int
    styles: str
    size: int
    consistent: str
    anchors: int
    faces: str | None
    threshold: float
    seed: int
    shard: str | None
    batch_size: int
    writers: int
    device: str | None
    vae: Path | None = None


def run_generate(args: GenerateArgs, console: Console) -> dict:
    # 1. Arguments, before the model loads.
    consistent = tuple(c.strip() for c in args.consistent.split(",") if c.strip() and c.strip() != "none")
    named = tuple(s.strip() for s in args.styles.split(",") if s.strip() not in ("", "none"))
    styles = tuple(STYLES) if args.styles == "all" else named
    faces = args.faces or ("dlib" if "filter" in consistent else None)
    options = PlanOptions(args.per_identity, args.per_style, styles, args.size, args.seed, consistent, args.anchors,
                          args.threshold, faces)  # fmt: skip
    shard, device = _shard_and_device(args.shard, args.device)
    source = args.identities
    identities = generated_identities(int(source), args.seed) if source.isdigit() else read_identities(Path(source))
    analyzer = _analyzer(faces) if faces else None
    if analyzer is not None:
        analyzer()  # the backend's files are checked now, not on a writer thread after the first batch
    if args.turbo not in PRESETS:
        check_turbo_folder(args.turbo)
    record = run_record(options, turbo_fingerprint(args.turbo, args.vae))
    prepare_output(args.out, record)  # another set's folder, or an unwritable one, fails before the model loads
    _warn_if_short_of_space(args.out, len(shard.select(identities)), options, console)
    # 2. The model.
    with console.status(f"Loading {args.turbo}..."):
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        pipe = load_turbo(args.turbo, device, dtype, vae=args.vae)
    generator = SetGenerator(pipe, options, args.batch_size, args.writers, analyzer)
    # 3. The run.
    columns = (TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("generate", total=None)
        summary = generator.run(
            identities, args.out, record, shard,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    return summary


def summary_text(summary: dict) -> str:
    lines = [
        f"identities: {summary['identities_done']} of {summary['identities']} done, {summary['identities_kept']} kept;"
        f" images: {summary['images']} (kept share {summary['kept_share']})"
    ]
    lines += [f"dropped: {count} {reason}" for reason, count in summary["dropped"].items()]
    if "faces" in summary:
        faces = summary["faces"]
        lines.append(
            f"faces ({faces['backend']}): within-identity cosine {_number(faces['within_identity_cosine'])} over "
            f"{faces['identities_measured']} identities, between-identity {_number(faces['between_identity_cosine'])}"
        )
    run = summary.get("this_run")
    if run:
        lines.append(f"this run: {run['images_generated']} images in {run['seconds']} s "
                     f"({run['images_per_second']} images/s)")  # fmt: skip
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _shard_and_device(shard: str | None, device: str | None) -> tuple[Shard, str]:
    """``--shard auto`` takes RANK/WORLD_SIZE and the GPU LOCAL_RANK from ``accelerate launch`` or ``torchrun``."""
    validation.device(device)
    if shard == "auto":
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        picked = Shard(rank, world)
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    else:
        picked = Shard.parse(shard) if shard else Shard()
    return picked, device or ("cuda" if torch.cuda.is_available() else "cpu")


def _analyzer(faces: str):
    from ..faces import FaceBackend

    backend = FaceBackend.parse(faces)
    if backend.kind in ("auto", "off"):
        raise ValueError(f"faces: name a backend ('dlib', 'dlib:cnn', 'insightface:DIR'), not {faces!r}")
    return backend.open


def _warn_if_short_of_space(out: Path, identities: int, options: PlanOptions, console: Console) -> None:
    images = identities * (options.per_identity + options.per_style * len(options.styles))
    needed = images * options.size**2 * BYTES_PER_PIXEL
    existing = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if needed > free:
        console.print(f"warning: {images} images need about {needed / 1e9:.1f} GB; {existing} has "
                      f"{free / 1e9:.1f} GB free", highlight=False, soft_wrap=True)  # fmt: skip
