"""``manifest.json``: the only contract between export, engine build and runtime.

One manifest sits in each artefact folder (``engines/NAME/manifest.json``) and describes every network there:
ordered input/output names, dtypes, symbolic dims, optimisation profiles, precision, file hashes and the
versions that made them. The runtime learns everything it needs from it; nothing is inferred from file names.

:meth:`Manifest.load` checks the file against :data:`SCHEMA` (every key, type and dtype) and that every graph it
names exists; :meth:`Manifest.verify` checks the sha256 of the files a backend will load against the recorded ones.
:meth:`Manifest.save` replaces the file atomically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import ModelFilesError
from .integrity import is_sha256, verify_file
from .schema import COUNT, NAME, OBJECT, STRING, Check, Either, ListOf, MapOf, Object, OneOf, check, nullable, parse_json

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
DATA_SUFFIX = ".data"  # graphs above protobuf's 2 GB limit keep their weights in ``model.onnx.data``
# Tensor dtypes, by their torch/numpy names, that graphs may take or give.
DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool")
Shape = tuple[int, ...]

_RELATIVE = Check(NAME, lambda v: not Path(v).is_absolute() and ".." not in Path(v).parts, "a path inside the folder")
_SHA256 = Check(STRING, is_sha256, "a sha256 (64 lowercase hex digits)")
_TENSOR = Object({"name": NAME, "dtype": OneOf(DTYPES), "dims": ListOf(Either((COUNT, NAME), "a size or a dim name"))})
_SIZES = MapOf(COUNT)
SCHEMA = Object(
    {"precision": OneOf(("fp16", "fp32")), "model_fingerprint": STRING, "versions": MapOf(STRING),
     "networks": MapOf(Object(
         {"name": NAME, "inputs": ListOf(_TENSOR), "outputs": ListOf(_TENSOR),
          "profile": Object({"min": _SIZES, "opt": _SIZES, "max": _SIZES}), "onnx": _RELATIVE,
          "onnx_sha256": Check(STRING, lambda v: all(map(is_sha256, v.split(":"))), "sha256s joined by ':'")},
         {"parity": nullable(OBJECT, "an object"), "engine": nullable(_RELATIVE, "a path"),
          "engine_sha256": nullable(_SHA256, "a sha256"), "cache_key": nullable(STRING, "a string")})),
     "schema": OneOf((SCHEMA_VERSION,))},
    {"tensorrt": nullable(OBJECT, "an object")},
)  # fmt: skip


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
    # Once engines are built: backend ("tensorrt" or "tensorrt-rtx"), its version, what the engines were built for
    # (TensorRT: GPU name and compute capability; TensorRT-RTX: compute capabilities), builder options.
    tensorrt: dict[str, Any] | None = None
    schema: int = SCHEMA_VERSION

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / MANIFEST_NAME, asdict(self), indent=1)  # a reader never sees half a manifest

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """The folder's manifest, checked against :data:`SCHEMA`; every ONNX graph it names must exist."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFilesError(f"No {MANIFEST_NAME} in {folder}: export the model there first (lcmla export).")
        raw = parse_json(path)
        if isinstance(raw, dict) and raw.get("schema") != SCHEMA_VERSION:
            raise ModelFilesError(f"{path}: manifest schema {raw.get('schema')} is not the supported {SCHEMA_VERSION}.")
        check(raw, SCHEMA, path)
        for name, entry in raw["networks"].items():
            graphs, hashes = onnx_files(Path(folder) / entry["onnx"]), entry["onnx_sha256"].split(":")
            missing = [str(p) for p in graphs if not p.is_file()]
            if missing or len(graphs) != len(hashes):
                found = f"{missing[0]} is missing" if missing else f"{len(graphs)} files but {len(hashes)} hashes"
                raise ModelFilesError(f"{path}: networks[{name!r}].onnx: {found}")
        networks = {}
        for name, entry in raw["networks"].items():
            entry["inputs"] = [TensorInfo(t["name"], t["dtype"], tuple(t["dims"])) for t in entry["inputs"]]
            entry["outputs"] = [TensorInfo(t["name"], t["dtype"], tuple(t["dims"])) for t in entry["outputs"]]
            entry["profile"] = Profile(**entry["profile"])
            networks[name] = NetworkEntry(**entry)
        raw["networks"] = networks
        return cls(**raw)

    def verify(self, folder: str | Path, backend: str) -> None:
        """Check the sha256 of every file ``backend`` loads (``"onnxruntime"``: graphs and their data files;
        ``"tensorrt"``, ``"tensorrt-rtx"``: engines) against the manifest; an :class:`IntegrityError` names the file
        and both hashes."""
        folder, manifest = Path(folder), Path(folder) / MANIFEST_NAME
        for name, entry in self.networks.items():
            if backend != "onnxruntime":
                if entry.engine is None or entry.engine_sha256 is None:
                    raise ModelFilesError(f"{manifest}: networks[{name!r}].engine: not built (lcmla export without --onnx-only builds it)")
                if not (folder / entry.engine).is_file():
                    raise ModelFilesError(f"{manifest}: networks[{name!r}].engine: {folder / entry.engine} is missing")
                verify_file(folder / entry.engine, entry.engine_sha256, manifest)
            else:
                for path, expected in zip(onnx_files(folder / entry.onnx), entry.onnx_sha256.split(":")):
                    verify_file(path, expected, manifest)


# onnxruntime's names of tensor types -> the manifest's dtype names.
ORT_TYPES = {f"tensor({ort})": name for ort, name in (
    ("float", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("double", "float64"), ("int8", "int8"),
    ("int32", "int32"), ("int64", "int64"), ("uint8", "uint8"), ("bool", "bool"))}  # fmt: skip


def check_graph_io(entry: NetworkEntry, session: Any, folder: str | Path) -> None:
    """Every input and output the manifest lists must be in the graph (as an onnxruntime session reads it) with the
    manifest's dtype, so that a wrong manifest is named here instead of failing inside onnxruntime."""
    for kind, listed, args in (("inputs", entry.inputs, session.get_inputs()), ("outputs", entry.outputs, session.get_outputs())):
        graph = {arg.name: ORT_TYPES.get(arg.type, arg.type) for arg in args}
        for index, tensor in enumerate(listed):
            if graph.get(tensor.name) != tensor.dtype:
                found = f"dtype {graph[tensor.name]}" if tensor.name in graph else f"no {kind[:-1]} of that name"
                raise ModelFilesError(
                    f"{Path(folder) / MANIFEST_NAME}: networks[{entry.name!r}].{kind}[{index}]: {tensor.name!r} of dtype "
                    f"{tensor.dtype}, but the graph {Path(folder) / entry.onnx} has {found}"
                )


def onnx_files(path: Path) -> list[Path]:
    """The graph file and, for large graphs, its external data file."""
    data = path.with_name(path.name + DATA_SUFFIX)
    return [path, data] if data.exists() else [path]

