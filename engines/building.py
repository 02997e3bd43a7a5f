"""Building the TensorRT engines of an export folder, reusing those whose build inputs are unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from lcmla_sdk.integrity import sha256_file
from lcmla_sdk.manifest import Manifest

from .engine import BuildOptions, build_engine, engine_cache_key, gpu_identity, import_tensorrt


def build_engines(folder: str | Path, options: BuildOptions, log: Callable[[str], None] = print) -> Manifest:
    """Build a TensorRT engine for every ONNX graph in ``folder``'s manifest; reuse engines whose cache key
    (graph hash, profile shapes, options, TensorRT version, GPU) is unchanged."""
    trt = import_tensorrt()
    folder = Path(folder)
    manifest = Manifest.load(folder)
    gpu = gpu_identity()
    manifest.tensorrt = {"version": trt.__version__, **gpu, "options": asdict(options)}
    for name, entry in manifest.networks.items():
        key = engine_cache_key(entry, options, trt.__version__, gpu)
        engine_path = folder / name / "model.plan"
        if entry.cache_key == key and engine_path.exists() and sha256_file(engine_path) == entry.engine_sha256:
            log(f"{name}: engine up to date")
            continue
        build_engine(folder / entry.onnx, entry, options, engine_path, folder / "timing.cache")
        entry.engine, entry.engine_sha256, entry.cache_key = str(engine_path.relative_to(folder)), sha256_file(engine_path), key
        manifest.save(folder)
        log(f"{name}: built {entry.engine}")
    manifest.save(folder)
    return manifest
