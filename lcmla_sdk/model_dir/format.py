"""The lcmla model directory format: its index ``lcmla.json``, the components it names and the files they hold.

The index names each component by a path relative to the directory (or absolute, to use files where they are)::

    {"format": "lcmla-model", "format_version": 1,
     "pipeline": {"encoder_prompt": "A photo of a face", "face_size": 1024},   # + "has_kv_encoder": false for
                                                                              # the authors' no-K/V checkpoint
     "components": {
        "sdxl": "sdxl",                      # diffusers layout: unet, vae, text_encoder(_2), tokenizer(_2), scheduler
        "image_encoder": "image_encoder",    # transformers CLIPVisionModelWithProjection folder
        "adapter": "adapter",                # config.json + resampler.safetensors + ip_kv.safetensors, or an
                                             # original IP-Adapter file: {"path": "x.bin", "format": "ip-adapter"}
        "kv_encoder": "kv_encoder",          # config.json + kv_projections.safetensors + lora.safetensors
        "lcm_lora": "lcm_lora",              # optional: any SDXL LoRA file diffusers loads (or a folder with one)
        "vae": null,                         # optional VAE override (e.g. the fp16-fix VAE), diffusers folder
        "faces": "faces"},                   # optional insightface pack
     "files": {"adapter/ip_kv.safetensors": {"sha256": "...", "bytes": 123, "dtype": "float16"}, ...}}

A component may also be ``{"path": ..., "variant": "fp16"}`` for diffusers/transformers variant weight files.
``files`` is optional; :func:`lcmla_sdk.model_dir.validate` checks every file recorded there. (The ``manifest.json``
of an export folder is another file: :mod:`lcmla_sdk.manifest`.)
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFilesError
from ..integrity import is_sha256, sha256_file
from ..schema import COUNT, NAME, OBJECT, POSITIVE, STRING, Check, Either, Is, MapOf, Object, OneOf, check, nullable, parse_json, read_json
from ..weights import LORA_FILE, PICKLE_SUFFIXES, load_error_reason

INDEX = "lcmla.json"
FORMAT = "lcmla-model"
FORMAT_VERSION = 1
REQUIRED = ("sdxl", "image_encoder", "adapter", "kv_encoder")
OPTIONAL = ("lcm_lora", "vae", "faces")
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# safetensors' dtype codes -> torch's names, so that messages and records read the same for every file format.
SAFETENSORS_DTYPES = {
    **FLOAT_DTYPES, "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
# SDXL parts in diffusers layout and the stem of their weight files.
DIFFUSERS_PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
TRANSFORMERS_PARTS = {"text_encoder": "model", "text_encoder_2": "model"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
# The weight files whose headers are read, in this order (so a message names the first broken one of several). Not
# read: an LCM-LoRA (diffusers converts it), an original IP-Adapter file (checked when read).
HEADER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder", "kv_projections", "kv_lora", "ip_kv", "resampler")
# Pickled weights of transformers models are named pytorch_model.bin, not model.bin.
PICKLE_STEMS = {"model": "pytorch_model"}
COMPONENT = Either(
    (NAME, Object({"path": NAME}, {"variant": NAME, "format": OneOf(("ip-adapter",)), "resampler": OBJECT})),
    "a path, or an object with a 'path'",
)
INDEX_SCHEMA = Object(
    {"format": OneOf((FORMAT,)), "format_version": OneOf((FORMAT_VERSION,)),
     "components": Object({name: COMPONENT for name in REQUIRED}, {name: nullable(COMPONENT, "a component") for name in OPTIONAL})},
    {"pipeline": Object({}, {"encoder_prompt": STRING, "face_size": POSITIVE, "has_kv_encoder": Is(bool, "true or false")}),
     "files": MapOf(Object({"sha256": Check(STRING, is_sha256, "a sha256 (64 lowercase hex digits)"), "bytes": COUNT},
                           {"dtype": OneOf(tuple(SAFETENSORS_DTYPES.values()))}))},
)  # fmt: skip


@dataclass
class Component:
    name: str
    path: Path
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelLayout:
    """What a model directory holds (:func:`read_layout`), read in one pass: resolved components, configs, every
    file loading will read and the headers of its weight files; validated by :func:`lcmla_sdk.model_dir.validate`."""

    root: Path
    index: dict[str, Any]  # the parsed lcmla.json
    components: dict[str, Component]
    configs: dict[str, Any]
    weight_files: dict[str, Path]  # part name -> resolved weight file
    files: list[Path]  # every file that loading reads (weights, configs, tokenizers, ONNX)
    headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = field(default_factory=dict)  # HEADER_PARTS' headers
    verified: dict[Path, str] = field(default_factory=dict)  # file -> sha256 found equal to its record
    labels: dict[Path, str] = field(init=False)  # every file in ``files`` -> its :meth:`label`

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", {path: self.label(path) for path in self.files})

    def fingerprint(self) -> str:
        """sha256 over the index (without its ``files`` record) and the hash of every file read (a recorded hash
        stands in for a file of the recorded size that was not verified)."""
        recorded = self.index.get("files", {})
        digest = hashlib.sha256(canonical_json({k: v for k, v in self.index.items() if k != "files"}).encode())
        for path in sorted(self.files, key=self.labels.__getitem__):
            record = recorded.get(self.labels[path], {})
            file_hash = self.verified.get(path) or (record["sha256"] if record.get("bytes") == path.stat().st_size else None)
            digest.update(f"{self.labels[path]}={file_hash or sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def path(self, label: str) -> Path:
        """The file a ``files`` label names."""
        return labelled_path(self.root, label)

    def label(self, path: Path) -> str:
        """The path relative to the model directory, or absolute for files kept elsewhere."""
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return path.resolve().as_posix()


def labelled_path(root: Path, label: str) -> Path:
    """The file a ``files`` label names, under ``root`` unless absolute."""
    return Path(label) if Path(label).is_absolute() else root / label


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    if not path.is_file():
        raise ModelFilesError(f"{root}: not an lcmla model directory (no {INDEX}); `lcmla convert` makes one")
    index = parse_json(path)
    found = (index.get("format"), index.get("format_version")) if isinstance(index, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise ModelFilesError(
            f"{path}: format {found[0]!r} version {found[1]!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    check(index, INDEX_SCHEMA, path)
    return index


def read_components(root: Path, index: dict[str, Any]) -> dict[str, Component]:
    """The named components (``index`` fits :data:`INDEX_SCHEMA`), each of which must exist."""
    entries = index["components"]
    components = {}
    for name, entry in entries.items():
        if not entry:
            continue
        path = component_path(root, name, entry)
        if not path.exists():
            raise ModelFilesError(f"{path}: missing (component {name!r} of {root / INDEX})")
        options = {k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else {}
        components[name] = Component(name, path, options)
    return components


def component_path(root: Path, name: str, entry: str | dict[str, Any]) -> Path:
    """A component's path from its index entry (a path, or an object with a ``path``), relative to ``root``."""
    path = Path(entry if isinstance(entry, str) else entry["path"]).expanduser()
    return path if path.is_absolute() else root / path


def weight_file(folder: Path, stem: str, variant: str | None) -> Path:
    """``stem[.variant].safetensors``, its sharded index, or the pickled ``.bin`` that diffusers/transformers name."""
    name = f"{stem}.{variant}" if variant else stem
    pickle_stem = PICKLE_STEMS.get(stem, stem)
    pickle_name = f"{pickle_stem}.{variant}.bin" if variant else f"{pickle_stem}.bin"
    for candidate in (f"{name}.safetensors", f"{name}.safetensors.index.json", pickle_name):
        if (folder / candidate).is_file():
            return folder / candidate
    raise ModelFilesError(f"{folder}: no weights ({name}.safetensors, its .index.json, or {pickle_name})")


def with_shards(path: Path) -> list[Path]:
    """A weight file, or a sharded index followed by the shard files it names."""
    if not path.name.endswith(".index.json"):
        return [path]
    return [path, *(path.parent / shard for shard in sorted(set(read_json(path).get("weight_map", {}).values())))]


def file_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, dtype)`` read from safetensors headers (or a memory-mapped weights-only pickle)."""
    try:
        if path.name.endswith(".index.json"):
            return {k: v for shard in with_shards(path)[1:] for k, v in file_header(shard).items()}
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                slices = {key: handle.get_slice(key) for key in handle.keys()}
                return {
                    key: (tuple(tensor.get_shape()), SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype()))
                    for key, tensor in slices.items()
                }
        if path.suffix in PICKLE_SUFFIXES:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ModelFilesError(f"{path}: not a flat state dict of tensors")
            return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ModelFilesError(f"{path}: unreadable weights: {load_error_reason(error)}") from None
    raise ModelFilesError(f"{path}: unknown weight format")


@dataclass
class _Found:
    """What :func:`read_layout` has found so far: configs (or their files) by part, weight files by part, and every
    file loading reads."""

    configs: dict[str, Any]
    config_files: dict[str, Path] = field(default_factory=dict)
    weights: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def config(self, part: str, path: Path) -> None:
        self.config_files[part] = path
        self.files.append(path)

    def add(self, part: str, folder: Path, stem: str, variant: str | None) -> None:
        """A diffusers or transformers folder: its ``config.json`` and weight file (or sharded index and shards)."""
        self.config(part, folder / "config.json")
        self.weights[part] = weight_file(folder, stem, variant)
        self.files += with_shards(self.weights[part])


def read_layout(root: Path) -> ModelLayout:
    """One pass over the directory at ``root``: the index, its components, every file loading reads (each must exist,
    as must every file the index records), the headers of the weight files (:data:`HEADER_PARTS`), the tokenizer
    files (JSON objects, UTF-8 text) and the configs. Keys, shapes, dtypes and hashes are checked after:
    :func:`lcmla_sdk.model_dir.checks.check`."""
    index = read_index(root)
    components = read_components(root, index)
    found = _find_files(root, index, components)
    missing = [str(p) for p in found.files if not p.is_file()]
    if missing:
        raise ModelFilesError(f"missing files: {', '.join(missing[:5])}")
    headers = {part: file_header(found.weights[part]) for part in HEADER_PARTS if part in found.weights}
    # After the headers: a weight file replaced by one of another format (its old name still recorded) is reported
    # for what is wrong with the new file.
    gone = [label for label in index.get("files", {}) if not labelled_path(root, label).is_file()]
    if gone:
        raise ModelFilesError(
            f"{root / INDEX}: files[{gone[0]!r}]: the recorded file {labelled_path(root, gone[0])} is missing"
        )
    for part in ("tokenizer", "tokenizer_2"):
        _check_tokenizer_files(components["sdxl"].path / part)
    configs = {**found.configs, **{part: read_json(path) for part, path in found.config_files.items()}}
    return ModelLayout(root, index, components, configs, found.weights, found.files, headers)


def _find_files(root: Path, index: dict[str, Any], components: dict[str, Component]) -> _Found:
    """Every file loading reads (found, not yet known to exist), with the configs and weight files among them."""
    found = _Found({"pipeline": index.get("pipeline", {})}, files=[root / INDEX])
    _find_sdxl(found, components)
    image_encoder = components["image_encoder"]
    found.add("image_encoder", image_encoder.path, "model", image_encoder.options.get("variant"))
    kv_dir = components["kv_encoder"].path
    found.config("kv_encoder", kv_dir / "config.json")
    found.weights |= {"kv_projections": kv_dir / "kv_projections.safetensors", "kv_lora": kv_dir / "lora.safetensors"}
    found.files += [found.weights["kv_projections"], found.weights["kv_lora"]]
    _find_adapter(found, components["adapter"])
    if "lcm_lora" in components:
        path = components["lcm_lora"].path
        found.weights["lcm_lora"] = path / LORA_FILE if path.is_dir() else path
        found.files.append(found.weights["lcm_lora"])
    if "faces" in components:
        found.files += sorted(components["faces"].path.glob("*.onnx"))
    return found


def _find_sdxl(found: _Found, components: dict[str, Component]) -> None:
    """The SDXL base in diffusers layout (with the VAE override, if any): configs, weights, scheduler, tokenizer files."""
    sdxl = components["sdxl"]
    variant = sdxl.options.get("variant")
    folders = {part: sdxl.path / part for part in (*DIFFUSERS_PARTS, *TRANSFORMERS_PARTS)}
    if "vae" in components:
        folders["vae"] = components["vae"].path
    for part, folder in folders.items():
        found.add(part, folder, DIFFUSERS_PARTS.get(part) or TRANSFORMERS_PARTS[part], variant)
    found.config("scheduler", sdxl.path / "scheduler" / "scheduler_config.json")
    for part in ("tokenizer", "tokenizer_2"):
        files = [sdxl.path / part / name for name in TOKENIZER_FILES if (sdxl.path / part / name).is_file()]
        if not any(p.name == "tokenizer.json" for p in files) and len(files) < 2:
            raise ModelFilesError(f"{sdxl.path / part}: missing CLIP tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
        found.files += files


def _check_tokenizer_files(folder: Path) -> None:
    """JSON objects and UTF-8 text, so that a damaged file is named here rather than by the tokenizers library."""
    for path in sorted(folder.glob("*.json")):
        read_json(path)
    if (folder / "merges.txt").is_file():
        try:
            (folder / "merges.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ModelFilesError(f"{folder / 'merges.txt'}: not UTF-8 text: {error}") from None


def _find_adapter(found: _Found, adapter: Component) -> None:
    """lcmla's adapter folder, or an original IP-Adapter file (its resampler config read from the file at load)."""
    if adapter.options.get("format") == "ip-adapter":
        found.weights["ip_adapter"] = adapter.path
        found.files.append(adapter.path)
        if "resampler" in adapter.options:
            found.configs["resampler"] = adapter.options["resampler"]
        return
    found.config("resampler", adapter.path / "config.json")
    found.weights |= {"resampler": adapter.path / "resampler.safetensors", "ip_kv": adapter.path / "ip_kv.safetensors"}
    found.files += [found.weights["resampler"], found.weights["ip_kv"]]


def describe(root: str | Path) -> list[tuple[str, str, str, str]]:
    """Rows ``(component, path, dtypes, size or problem)`` for ``lcmla info``; never raises for a missing file (the
    index itself must fit :data:`INDEX_SCHEMA`)."""
    root = Path(root).expanduser()
    index = read_index(root)
    rows = []
    for name in REQUIRED + OPTIONAL:
        entry = index["components"].get(name)
        if not entry:  # an optional component (required ones are in every valid index)
            rows.append((name, "-", "-", "not present"))
            continue
        path = component_path(root, name, entry)
        if not path.exists():
            rows.append((name, str(path), "-", "MISSING"))
            continue
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        dtypes = sorted({d for p in files if p.suffix == ".safetensors" for _, d in _safe_header(p).values()})
        rows.append((name, str(path), ",".join(dtypes) or "-", _human(sum(p.stat().st_size for p in files))))
    return rows


def _safe_header(path: Path) -> dict:
    try:
        return file_header(path)
    except ModelFilesError:
        return {}


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"
