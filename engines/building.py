"""Building the engines of an export folder with a backend (TensorRT or TensorRT-RTX), reusing those whose build
inputs are unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from lcmla_sdk.integrity import sha256_file
from lcmla_sdk.manifest import Manifest

from .backends import EngineBackend, TensorRT
from .engine import BuildOptions, build_engine, engine_cache_key


def build_engines(folder: str | Path, options: BuildOptions, log: Callable[[str], None] = print,
                  backend: EngineBackend | None = None) -> Manifest:  # fmt: skip
    """Build an engine with ``backend`` (default: :class:`TensorRT`) for every ONNX graph in ``folder``'s manifest;
    reuse engines whose cache key (graph hash, profile shapes, options, backend, its version and target) is
    unchanged."""
    backend = backend or TensorRT()
    module = backend.load_module()
    folder = Path(folder)
    manifest = Manifest.load(folder)
    record = backend.record(module)
    manifest.tensorrt = {**record, "options": asdict(options)}
    for name, entry in manifest.networks.items():
        key = engine_cache_key(entry, options, record)
        engine_path = folder / name / "model.plan"
        if entry.cache_key == key and engine_path.exists() and sha256_file(engine_path) == entry.engine_sha256:
            log(f"{name}: engine up to date")
            continue
        build_engine(backend, folder, entry, options, engine_path)
        entry.engine, entry.engine_sha256, entry.cache_key = str(engine_path.relative_to(folder)), sha256_file(engine_path), key
        manifest.save(folder)
        log(f"{name}: built {entry.engine}")
    manifest.save(folder)
    return manifest
