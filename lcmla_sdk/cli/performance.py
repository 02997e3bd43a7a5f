"""Speed: ``lcmla bench`` (timings of every way to generate) and ``lcmla export`` (ONNX graphs, engines, compiled
networks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..defaults import MODES
from .common import USER_ERRORS, console, fail


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
    from ..bench import WAYS, BenchConfig, planned_runs, run_bench, table
    from ..bench_compiled import compare as compare_runs

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
    compute_capability: Optional[list[str]] = typer.Option(
        None, help="tensorrt-rtx only: a compute capability to compile for (repeat; default 8.0 8.6 8.9 12.0 12.1; "
        "7.5 for Turing)."),
    device: Optional[str] = typer.Option(None, help="Device to trace on (default: cuda if available)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip hashing the model directory's files."),
    backend: str = typer.Option("tensorrt", help="'tensorrt': ONNX graphs, then engines when TensorRT is installed; "
                                "'tensorrt-rtx': the same with TensorRT for RTX (built without a GPU, runs on compute "
                                "capability 8.0, 8.6, 8.9, 12.x); 'torch': networks compiled by torch.compile for "
                                "--shapes (on this GPU)."),
    shapes: str = typer.Option("fast:1,fast:8,quality:1", help="With --backend torch: MODE:IMAGES[:HxW], comma-separated "
                               "(size: the model's default)."),
    jobs: int = typer.Option(4, help="With --backend torch: build processes at once."),
) -> None:
    """Export ONNX graphs (and TensorRT or TensorRT-RTX engines when it is installed) of every network, or build
    compiled networks (--backend torch)."""
    import torch

    from .. import validation

    if backend == "torch":
        return _export_compiled(model, out, shapes, device, jobs)
    from ..engines import BACKENDS, BuildOptions, TensorRTRTX, TensorRTUnavailable, build_engines
    from ..export import ShapeRanges, export_model, parse_range
    from ..pipeline import Personalizer

    try:
        if static is not None and (height or width):
            raise ValueError("static: give either --static H W or --height/--width ranges, not both")
        validation.device(device)
        options = BuildOptions("fp16" if fp16 else "fp32", opt_level)  # checked before the export, not after
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not one of {(*BACKENDS, 'torch')}")
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


def _export_compiled(model: str, out: Optional[Path], shapes: str, device: Optional[str], jobs: int) -> None:
    from .. import validation
    from ..engines.compiled import build_compiled, parse_shapes

    try:
        validation.device(device)
        folder = out if out is not None else Path("engines") / f"{Path(model).name}-compiled"
        build_compiled(model, folder, parse_shapes(shapes), device or "cuda", jobs, log=console.print)
    except USER_ERRORS as error:
        raise fail(error) from None
    typer.echo(str(folder / "compiled.json"))
