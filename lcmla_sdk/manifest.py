"""``manifest.json``: the only contract between export, engine build and runtime.

One manifest sits in each artefact folder (``engines/NAME/manifest.json``) and describes every network there:
ordered input/output names, dtypes, symbolic dims, optimisation profiles, precision, file hashes and the
versions that made them. The runtime learns everything it needs from it; nothing is inferred from file names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFilesError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: its name, dtype (numpy name) and dims (ints static, strings symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def shape(self, sizes: dict[str, int]) -> Shape:
        """Concrete shape for symbolic sizes, e.g. ``{"batch": 2, "height": 16}``."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)


@dataclass(frozen=True)
class Profile:
    """Min / opt / max symbolic sizes of one optimisation profile."""

    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]


@dataclass
class NetworkEntry:
    """One network of the folder: its ONNX graph and, once built, its TensorRT engine."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    profile: Profile
    onnx: str
    onnx_sha256: str
    parity: dict[str, Any] | None = None
    engine: str | None = None
    engine_sha256: str | None = None
    cache_key: str | None = None

    def input_shapes(self, which: str) -> dict[str, Shape]:
        """``{input name: shape}`` at the profile's ``min``, ``opt`` or ``max``."""
        sizes = getattr(self.profile, which)
        return {t.name: t.shape(sizes) for t in self.inputs}


@dataclass
class Manifest:
    precision: str  # "fp16" or "fp32"
    model_fingerprint: str
    versions: dict[str, str]
    networks: dict[str, NetworkEntry] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None  # version, GPU name and compute capability, builder options
    schema: int = SCHEMA_VERSION

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a manifest
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFilesError(f"No {MANIFEST_NAME} in {folder}: export the model there first (lcmla export).")
        raw = json.loads(path.read_text())
        if raw.get("schema") != SCHEMA_VERSION:
            raise ModelFilesError(f"{path}: manifest schema {raw.get('schema')} is not the supported {SCHEMA_VERSION}.")
        networks = {}
        for name, entry in raw["networks"].items():
            entry["inputs"] = [TensorInfo(t["name"], t["dtype"], tuple(t["dims"])) for t in entry["inputs"]]
            entry["outputs"] = [TensorInfo(t["name"], t["dtype"], tuple(t["dims"])) for t in entry["outputs"]]
            entry["profile"] = Profile(**entry["profile"])
            networks[name] = NetworkEntry(**entry)
        raw["networks"] = networks
        return cls(**raw)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
