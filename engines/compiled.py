"""Compiled networks (``backend="torch"``): the sampling step's networks and the VAE decode compiled whole by
``torch.compile`` (Inductor) ahead of time, built once into a folder and loaded from it, on any device PyTorch
compiles for.

Folder layout::

    compiled.json                the manifest: model fingerprint, versions, GPU, shapes built, artefacts, cache key
    aot-NETWORK-SIGNATURE.bin    one network's function at one call signature (lcmla_sdk.compiling.AheadOfTime)

:func:`build_compiled` runs one generation of every shape asked in parallel processes (one job per shape), each
compiling and saving a function for every network call it makes (the K/V pass, the denoiser), and one more job that
compiles the VAE decode at every distinct batch and size (shapes often share one, and the shape jobs are shorter);
:func:`load_compiled` refuses a folder made for another model, PyTorch, Triton, diffusers or GPU and switches the
model to compiled networks that load each function on the first call with its signature (seconds, no tracing). A
call at a shape the folder was not built for compiles lazily (minutes, with a warning). Nothing compiles unless
asked: these two functions and ``Personalizer.warmup(..., compile=True)``.

Whole-network compilation was chosen by measurement (``benchmarks/compile_probe.py``, H100, batch 1, 1024^2): the
LCM denoiser 32.6 -> 24.8 ms and the K/V-encoder 25.7 -> 19.4 ms, against 27.9 ms for the denoiser compiled by
regions (transformer and resnet blocks), which also compiled slower (138 s against 115 s: every transformer block
reads its own K/V layer, so each one is traced on its own).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lcmla_sdk.atomic import atomic_directory, write_json
from lcmla_sdk.compiling import AheadOfTime
from lcmla_sdk.cuda_graphs import say_once
from lcmla_sdk.errors import ModelFilesError
from lcmla_sdk.integrity import sha256_file, sha256_json, verify_file
from lcmla_sdk.schema import COUNT, STRING, Is, ListOf, MapOf, Object, OneOf, check, read_json

from .backends import EngineMismatchError, gpu_identity

MANIFEST = "compiled.json"
SCHEMA_VERSION = 2  # 2: functions compiled ahead of time (1 held Inductor caches)
BOOL = Is(bool, "true or false")
_SHAPE = Object({"mode": OneOf(("fast", "quality")), "batch": COUNT, "height": COUNT, "width": COUNT,
                 "references": COUNT, "use_kv": BOOL, "kv_cache": BOOL})  # fmt: skip
SCHEMA = Object({
    "schema": OneOf((SCHEMA_VERSION,)), "model": STRING, "model_fingerprint": STRING, "versions": MapOf(STRING),
    "gpu": MapOf(STRING), "shapes": ListOf(_SHAPE), "artefacts": MapOf(STRING), "cache_key": STRING,
    "build_s": STRING,
})  # fmt: skip


@dataclass(frozen=True)
class CompiledShape:
    """One generation shape to build for: what :meth:`Personalizer.warmup` takes."""

    mode: str = "fast"
    batch: int = 1
    height: int = 0  # 0: the model's default size
    width: int = 0
    references: int = 1
    use_kv: bool = True
    kv_cache: bool = False


def parse_shapes(text: str) -> list[CompiledShape]:
    """``"fast:1,fast:8,quality:1:768x1024"`` -> shapes (MODE:IMAGES[:HxW]; size 0: the model's default)."""
    shapes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) not in (2, 3) or fields[0] not in ("fast", "quality"):
                raise ValueError
            height, width = map(int, fields[2].split("x")) if len(fields) == 3 else (0, 0)
            shapes.append(CompiledShape(fields[0], int(fields[1]), height, width))
        except ValueError:
            raise ValueError(f"shapes: expected MODE:IMAGES[:HxW] (mode fast or quality), got {part!r}") from None
        if shapes[-1].batch < 1 or height < 0 or width < 0:
            raise ValueError(f"shapes: images and sizes must be positive, got {part!r}")
    return shapes


def versions() -> dict[str, str]:
    """What compiled code depends on besides the model and the GPU."""
    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "diffusers", "lcmla"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def device_identity(device: torch.device) -> dict[str, str]:
    return gpu_identity() if device.type == "cuda" else {"gpu": "cpu", "compute_capability": "none"}


def cache_key(fingerprint: str, shapes: Sequence[CompiledShape], found_versions: dict, gpu: dict) -> str:
    """Hash of every build input: the model's weights fingerprint, the shapes, the versions and the GPU."""
    return sha256_json([fingerprint, [asdict(s) for s in shapes], found_versions, gpu])


def build_compiled(
    model_name: str, folder: str | Path, shapes: Sequence[CompiledShape], device: str = "cuda", jobs: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Compile every network for ``shapes`` and write the folder (manifest + functions), atomically.

    ``model_name``: what ``Personalizer.from_pretrained`` takes (a model directory or a preset). Each shape is a job
    of its own (the functions are specialised to their call shapes), and the decodes one more; up to ``jobs`` build
    processes run at once.
    """
    from lcmla_sdk.pipeline import Personalizer

    model = Personalizer.from_pretrained(model_name, device=device, faces=None)
    size, fingerprint, on = model.default_size, model.fingerprint, model.device
    shapes = list(dict.fromkeys(replace(s, height=s.height or size, width=s.width or size) for s in shapes))
    for shape in shapes:
        if shape.height % model.size_multiple or shape.width % model.size_multiple:
            raise ValueError(f"shapes: {shape.height}x{shape.width} is not a multiple of {model.size_multiple}")
    del model  # the jobs load their own
    if on.type == "cuda":
        torch.cuda.empty_cache()
    decodes = sorted({(s.batch, s.height, s.width) for s in shapes})
    work = [{"shape": asdict(s)} for s in shapes] + [{"decodes": decodes}]
    begin = time.perf_counter()
    with atomic_directory(folder) as staging:
        running: list[tuple[int, dict, subprocess.Popen]] = []
        pending = list(enumerate(work))
        while pending or running:
            while pending and len(running) < jobs:
                index, what = pending.pop(0)
                job = {"model": model_name, "device": device, "folder": str(staging), **what}
                running.append((index, what, _start_job(job, staging / f"job-{index}.log")))
            index, what, process = running.pop(0)
            process.wait()
            job_log = staging / f"job-{index}.log"
            if process.returncode != 0:
                raise RuntimeError(f"compile job {index} ({what}) failed:\n{job_log.read_text()[-3000:]}")
            job_log.unlink()
            log(f"compiled {what} ({time.perf_counter() - begin:.0f} s)")
        return write_manifest(staging, fingerprint, on, str(model_name), shapes, time.perf_counter() - begin)


def write_manifest(folder: Path, fingerprint: str, device: torch.device, model_name: str,
                   shapes: Sequence[CompiledShape], build_s: float) -> dict:  # fmt: skip
    """``compiled.json`` for the artefacts in ``folder``, made for the model ``fingerprint`` on this machine."""
    found_versions, gpu = versions(), device_identity(device)
    manifest = {
        "schema": SCHEMA_VERSION, "model": model_name, "model_fingerprint": fingerprint,
        "versions": found_versions, "gpu": gpu, "shapes": [asdict(s) for s in shapes],
        "artefacts": {p.name: sha256_file(p) for p in sorted(folder.glob("aot-*.bin"))},
        "cache_key": cache_key(fingerprint, shapes, found_versions, gpu), "build_s": f"{build_s:.1f}",
    }  # fmt: skip
    write_json(folder / MANIFEST, manifest, indent=1)
    return manifest


def _start_job(job: dict[str, Any], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lcmla_sdk.engines.compiled", json.dumps(job)]
    with open(log_path, "w") as job_log:  # a file, not a pipe: a chatty job never blocks
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=job_log)


def run_job(job: dict[str, Any]) -> None:
    """One build process: with ``shape``, generate once at that shape (to latents: no decode), compiling and saving
    each network call's function; with ``decodes``, compile and save the decode at each ``(batch, height, width)``."""
    from lcmla_sdk.pipeline import Personalizer

    model = Personalizer.from_pretrained(job["model"], device=job["device"], faces=None)
    ahead = AheadOfTime(job["folder"], record=True)
    model.compile_networks(ahead)  # each function compiles on its first call only
    model.decoder.compile(model.default_size // model.vae_scale, warm=False, ahead=ahead)
    with torch.inference_mode():
        if "shape" in job:
            shape = CompiledShape(**job["shape"])
            model.warmup(shape.mode, shape.batch, shape.height, shape.width, shape.references, shape.use_kv,
                         shape.kv_cache, compile=True, progress=False)  # fmt: skip
        for batch, height, width in job.get("decodes", ()):
            latents = torch.zeros(batch, model.unet.config.in_channels, height // model.vae_scale,
                                  width // model.vae_scale, device=model.device, dtype=model.dtype)  # fmt: skip
            model.decode(latents, "pt")  # as a call of that shape makes it


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise ModelFilesError(f"{path}: no {MANIFEST}: not a folder written by `lcmla export --backend torch`")
    manifest = read_json(path)
    check(manifest, SCHEMA, path)
    return manifest


def check_compatible(manifest: dict[str, Any], fingerprint: str, device: torch.device, where: str) -> None:
    """Raise :class:`EngineMismatchError` naming the first build input that differs from this process's."""
    expected = {"model_fingerprint": fingerprint, **{f"versions.{k}": v for k, v in versions().items()},
                **{f"gpu.{k}": v for k, v in device_identity(device).items()}}  # fmt: skip
    recorded = {"model_fingerprint": manifest["model_fingerprint"],
                **{f"versions.{k}": v for k, v in manifest["versions"].items()},
                **{f"gpu.{k}": v for k, v in manifest["gpu"].items()}}  # fmt: skip
    for field, value in expected.items():
        if recorded.get(field) != value:
            raise EngineMismatchError(
                f"{where}: built for {field} {recorded.get(field)!r}, but this is {value!r}; rebuild it with "
                f"`lcmla export --backend torch` (or load with compiled_fallback=True to run uncompiled)"
            )


def load_compiled(model, folder: str | Path, verify: bool = True, fallback: bool = False) -> dict[str, Any] | None:
    """Check ``folder`` against ``model`` and this machine and switch the model's networks and decode to the
    folder's functions (each loaded on its first call). Returns the manifest. ``fallback``: a folder made for another
    model, PyTorch or GPU (:class:`EngineMismatchError`) is skipped with a warning instead, the model left
    uncompiled (returns ``None``)."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    try:
        check_compatible(manifest, model.fingerprint, model.device, str(folder / MANIFEST))
    except EngineMismatchError as error:
        if not fallback:
            raise
        say_once(f"{error}: running uncompiled")
        return None
    for name, digest in manifest["artefacts"].items():
        path = folder / name
        if not path.is_file():
            raise ModelFilesError(f"{path}: missing (listed in {folder / MANIFEST})")
        if verify:
            verify_file(path, digest, folder / MANIFEST)
    ahead = AheadOfTime(folder, manifest["artefacts"])
    model.compile_networks(ahead)
    model.decoder.compile(model.default_size // model.vae_scale, warm=False, ahead=ahead)
    return manifest


if __name__ == "__main__":
    run_job(json.loads(sys.argv[1]))
