"""lcmla model directories: the ``lcmla.json`` manifest, validation before any heavy load, loading and saving.

A manifest names each component by a path relative to the directory (or absolute, to use files where they are)::

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
The manifest is checked against :data:`MANIFEST_SCHEMA` before use. ``files`` is optional: every file recorded there
must exist; sizes and dtypes are checked, and, unless ``validate(..., verify=False)``, every recorded file that loading
reads is hashed (streaming, cached: :mod:`lcmla_sdk.integrity`) and must match its ``sha256``.
``save`` writes the whole directory beside its place and swaps it in (:mod:`lcmla_sdk.atomic`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .atomic import atomic_directory, write_json
from .attention import install_lookahead_processors
from .errors import ModelFilesError
from .faces import check_face_pack
from .integrity import is_sha256, sha256_file, verify_file
from .lora import add_kv_encoder_lora, has_adapter, LCM_ADAPTER
from .presets import Components
from .text import check_tokenizer_files, load_tokenizer
from .schema import COUNT, NAME, OBJECT, POSITIVE, STRING, Check, Either, Is, MapOf, Object, OneOf, check, nullable, parse_json, read_json
from .weights import (
    PICKLE_SUFFIXES,
    check_shapes,
    extra_state,
    kv_encoder_lora_state,
    load_extra_state,
    load_ip_adapter,
    read_ip_adapter,
    resampler_config_from_ip_adapter,
    load_kv_encoder_lora,
    load_error_reason,
    load_lcm_lora,
    load_module_state,
    read_state_dict,
    save_lcm_lora,
    shapes,
)

MANIFEST = "lcmla.json"
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
# Pickled weights of transformers models are named pytorch_model.bin, not model.bin.
PICKLE_STEMS = {"model": "pytorch_model"}
# Where diffusers records the folder a model was loaded from; left out of saved configs so that a directory's
# fingerprint does not depend on where its weights came from.
SOURCE_PATH_KEY = "_name_or_path"
# CLIP checkpoints written by older transformers carry this buffer; current models rebuild it.
IGNORED_SUFFIXES = ("position_ids",)

COMPONENT = Either(
    (NAME, Object({"path": NAME}, {"variant": NAME, "format": OneOf(("ip-adapter",)), "resampler": OBJECT})),
    "a path, or an object with a 'path'",
)
MANIFEST_SCHEMA = Object(
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


@dataclass
class ModelLayout:
    """A validated model directory: resolved components, configs, and every file loading will read."""

    root: Path
    manifest: dict[str, Any]
    components: dict[str, Component]
    configs: dict[str, Any]
    weight_files: dict[str, Path]  # part name -> resolved weight file
    files: list[Path]  # every file that loading reads (weights, configs, tokenizers, ONNX)
    verified: dict[Path, str] = field(default_factory=dict)  # file -> sha256 found equal to its record

    def fingerprint(self) -> str:
        """sha256 over the manifest (without its ``files`` record) and the hash of every file read (a recorded hash
        stands in for a file of the recorded size that was not verified)."""
        recorded = self.manifest.get("files", {})
        digest = hashlib.sha256(_canonical({k: v for k, v in self.manifest.items() if k != "files"}).encode())
        for path in sorted(self.files, key=lambda p: self.label(p)):
            record = recorded.get(self.label(path), {})
            file_hash = self.verified.get(path) or (record["sha256"] if record.get("bytes") == path.stat().st_size else None)
            digest.update(f"{self.label(path)}={file_hash or sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def path(self, label: str) -> Path:
        """The file a ``files`` label names."""
        return Path(label) if Path(label).is_absolute() else self.root / label

    def label(self, path: Path) -> str:
        """The path relative to the model directory, or absolute for files kept elsewhere."""
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return path.resolve().as_posix()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def is_model_dir(name: str | Path) -> bool:
    return Path(name).expanduser().is_dir()


# ------------------------------------------------------------------ validation (headers and configs only)
def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise ModelFilesError(f"{root}: not an lcmla model directory (no {MANIFEST}); `lcmla convert` makes one")
    manifest = parse_json(path)
    found = (manifest.get("format"), manifest.get("format_version")) if isinstance(manifest, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise ModelFilesError(
            f"{path}: format {found[0]!r} version {found[1]!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    check(manifest, MANIFEST_SCHEMA, path)
    return manifest


def _components(root: Path, manifest: dict[str, Any]) -> dict[str, Component]:
    """The named components (``manifest`` fits :data:`MANIFEST_SCHEMA`), each of which must exist."""
    entries = manifest["components"]
    components = {}
    for name, entry in entries.items():
        if not entry:
            continue
        path = _component_path(root, name, entry)
        if not path.exists():
            raise ModelFilesError(f"{path}: missing (component {name!r} of {root / MANIFEST})")
        options = {k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else {}
        components[name] = Component(name, path, options)
    return components


def _component_path(root: Path, name: str, entry: str | dict[str, Any]) -> Path:
    """A component's path from its manifest entry (a path, or an object with a ``path``), relative to ``root``."""
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


def _with_shards(path: Path) -> list[Path]:
    """A weight file, or a sharded index followed by the shard files it names."""
    if not path.name.endswith(".index.json"):
        return [path]
    return [path, *(path.parent / shard for shard in sorted(set(read_json(path).get("weight_map", {}).values())))]


def file_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, dtype)`` read from safetensors headers (or a memory-mapped weights-only pickle)."""
    try:
        if path.name.endswith(".index.json"):
            return {k: v for shard in _with_shards(path)[1:] for k, v in file_header(shard).items()}
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


def _check_file(
    layout: ModelLayout, path: Path, expected: dict[str, tuple], ignore_unexpected: tuple[str, ...] = ()
) -> None:
    header = file_header(path)
    found = {k: shape for k, (shape, _) in header.items() if not k.endswith(ignore_unexpected) or k in expected}
    check_shapes(expected, found, str(path))
    record = layout.manifest.get("files", {}).get(layout.label(path), {})
    wanted = record.get("dtype")
    wrong = sorted(k for k, (_, dtype) in header.items() if k in expected and (dtype not in FLOAT_DTYPES.values() or (wanted and dtype != wanted)))
    if wrong:
        dtype = header[wrong[0]][1]
        raise ModelFilesError(
            f"{path}: wrong dtype {dtype} for {len(wrong)} tensors (first: {wrong[0]}); "
            f"expected {wanted or 'a floating-point dtype'}"
        )
    # After the dtype check: a file rewritten in another dtype is reported as such, not as a size change.
    if "bytes" in record and record["bytes"] != path.stat().st_size:
        raise ModelFilesError(f"{path}: {path.stat().st_size} bytes, but {MANIFEST} records {record['bytes']}")


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple]:
    with torch.device("meta"):
        return shapes(build().state_dict())


def base_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The SDXL UNet's own weights under diffusers' names: no LoRA, no LCM-Lookahead projections."""
    return {
        k.replace(".base_layer", ""): v
        for k, v in unet.state_dict().items() if "lora_" not in k and ".processor." not in k
    }  # fmt: skip


@functools.lru_cache(maxsize=4)
def _unet_file_shapes(unet_config: str, kv_config: str) -> dict[str, dict[str, tuple]]:
    """Keys and shapes of every file the shared UNet loads, from a meta-device build with the KV-encoder LoRA.

    Cached by the configs' JSON text: peft's LoRA injection makes this the slowest part of validation.
    """
    kv_config = json.loads(kv_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(unet_config))
        blocks = install_lookahead_processors(unet)
        add_kv_encoder_lora(unet, blocks, kv_config["lora_rank"], kv_config.get("kv_lora_rank"))
    return {
        "unet": shapes(base_unet_state(unet)),
        "kv_projections": shapes(extra_state(unet, blocks, "kv")),
        "kv_lora": shapes(kv_encoder_lora_state(unet)),
        "ip_kv": shapes(extra_state(unet, blocks, "ip")),
    }  # fmt: skip


def validate(root: str | Path, verify: bool = True) -> ModelLayout:
    """Check the manifest, every named file, every weight's key, shape and dtype, and (``verify``) the sha256 of every
    recorded file that loading reads; load no weights."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    layout = ModelLayout(root, manifest, _components(root, manifest), {}, {}, [root / MANIFEST])
    components, configs = layout.components, layout.configs
    configs["pipeline"] = manifest.get("pipeline", {})

    sdxl = components["sdxl"]
    variant = sdxl.options.get("variant")
    parts = {part: sdxl.path / part for part in (*DIFFUSERS_PARTS, *TRANSFORMERS_PARTS)}
    if "vae" in components:
        parts["vae"] = components["vae"].path
    for part, folder in parts.items():
        configs[part] = read_json(folder / "config.json")
        stem = DIFFUSERS_PARTS.get(part) or TRANSFORMERS_PARTS[part]
        layout.weight_files[part] = weight_file(folder, stem, variant)
        layout.files += [folder / "config.json", *_with_shards(layout.weight_files[part])]
    configs["scheduler"] = read_json(sdxl.path / "scheduler" / "scheduler_config.json")
    layout.files.append(sdxl.path / "scheduler" / "scheduler_config.json")
    for part in ("tokenizer", "tokenizer_2"):
        found = [sdxl.path / part / name for name in TOKENIZER_FILES if (sdxl.path / part / name).is_file()]
        if not any(p.name == "tokenizer.json" for p in found) and len(found) < 2:
            raise ModelFilesError(f"{sdxl.path / part}: missing CLIP tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
        layout.files += found
        check_tokenizer_files(sdxl.path / part)

    image_encoder = components["image_encoder"].path
    configs["image_encoder"] = read_json(image_encoder / "config.json")
    layout.weight_files["image_encoder"] = weight_file(image_encoder, "model", components["image_encoder"].options.get("variant"))
    layout.files += [image_encoder / "config.json", *_with_shards(layout.weight_files["image_encoder"])]

    kv_dir = components["kv_encoder"].path
    configs["kv_encoder"] = read_json(kv_dir / "config.json")
    for part, name in (("kv_projections", "kv_projections.safetensors"), ("kv_lora", "lora.safetensors")):
        layout.weight_files[part] = kv_dir / name
    layout.files += [kv_dir / "config.json", *(layout.weight_files[p] for p in ("kv_projections", "kv_lora"))]

    adapter = components["adapter"]
    if adapter.options.get("format") == "ip-adapter":
        layout.weight_files["ip_adapter"] = adapter.path
        layout.files.append(adapter.path)
        if "resampler" in adapter.options:
            configs["resampler"] = adapter.options["resampler"]
    else:
        configs["resampler"] = read_json(adapter.path / "config.json")
        layout.weight_files["resampler"] = adapter.path / "resampler.safetensors"
        layout.weight_files["ip_kv"] = adapter.path / "ip_kv.safetensors"
        layout.files += [adapter.path / "config.json", layout.weight_files["resampler"], layout.weight_files["ip_kv"]]
    if "lcm_lora" in components:
        path = components["lcm_lora"].path
        layout.weight_files["lcm_lora"] = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        layout.files.append(layout.weight_files["lcm_lora"])
    if "faces" in components:
        check_face_pack(components["faces"].path)
        layout.files += sorted(components["faces"].path.glob("*.onnx"))
    missing = [str(p) for p in layout.files if not p.is_file()]
    if missing:
        raise ModelFilesError(f"missing files: {', '.join(missing[:5])}")
    _check_weights(layout)
    records = manifest.get("files", {})
    gone = [label for label in records if not layout.path(label).is_file()]
    if gone:
        raise ModelFilesError(f"{root / MANIFEST}: files[{gone[0]!r}]: the recorded file {layout.path(gone[0])} is missing")
    if verify:
        for path in layout.files:
            if layout.label(path) in records:
                layout.verified[path] = verify_file(path, records[layout.label(path)]["sha256"], root / MANIFEST)
    return layout


def _check_weights(layout: ModelLayout) -> None:
    configs, files = layout.configs, layout.weight_files
    unet_shapes = _unet_file_shapes(_canonical(configs["unet"]), _canonical(configs["kv_encoder"]))
    _check_file(layout, files["unet"], unet_shapes["unet"])
    _check_file(layout, files["vae"], _meta_shapes(lambda: AutoencoderKL.from_config(configs["vae"])))
    _check_file(layout, files["text_encoder"], _meta_shapes(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))), IGNORED_SUFFIXES)
    _check_file(layout, files["text_encoder_2"], _meta_shapes(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))), IGNORED_SUFFIXES)
    _check_file(layout, files["image_encoder"], _meta_shapes(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"]))), IGNORED_SUFFIXES)
    for part in ("kv_projections", "kv_lora", "ip_kv"):
        if part in files:  # an original IP-Adapter file (no ip_kv) is checked when it is read
            _check_file(layout, files[part], unet_shapes[part])
    if "resampler" in files:
        _check_file(layout, files["resampler"], _meta_shapes(lambda: IPAdapterPlusImageProjection(**configs["resampler"])))


# ------------------------------------------------------------------ loading
def load_sdxl(folder: Path, dtype: torch.dtype, variant: str | None = None, vae_dir: Path | None = None) -> dict[str, Any]:
    """The SDXL base parts of a diffusers-layout folder (local files only), by their ``Components`` names."""
    local = {"local_files_only": True}
    vae_config = AutoencoderKL.load_config(vae_dir or folder / "vae")
    vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet", variant=variant, torch_dtype=dtype, **local),
        "vae": AutoencoderKL.from_pretrained(
            vae_dir or folder / "vae", variant=None if vae_dir else variant, torch_dtype=vae_dtype, **local
        ),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", variant=variant, dtype=dtype, **local),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", variant=variant, dtype=dtype, **local
        ),
        "tokenizer": load_tokenizer(folder / "tokenizer"),
        "tokenizer_2": load_tokenizer(folder / "tokenizer_2"),
    }


def load(layout: ModelLayout, dtype: torch.dtype) -> Components:
    """Build every module from the validated files, with LCM-Lookahead's weights on the shared UNet."""
    configs, files, components = layout.configs, layout.weight_files, layout.components
    sdxl = components["sdxl"]
    vae_dir = components["vae"].path if "vae" in components else None
    parts = load_sdxl(sdxl.path, dtype, sdxl.options.get("variant"), vae_dir)
    unet = parts["unet"]
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        components["image_encoder"].path, variant=components["image_encoder"].options.get("variant"), dtype=dtype,
        local_files_only=True,
    )  # fmt: skip

    blocks = install_lookahead_processors(unet)
    if "ip_adapter" in files:
        ip_adapter = read_ip_adapter(files["ip_adapter"])
        configs.setdefault("resampler", resampler_config_from_ip_adapter(ip_adapter["image_proj"], files["ip_adapter"]))
        resampler = IPAdapterPlusImageProjection(**configs["resampler"])
        load_ip_adapter(ip_adapter, unet, blocks, resampler, files["ip_adapter"])
    else:
        resampler = IPAdapterPlusImageProjection(**configs["resampler"])
        load_module_state(resampler, read_state_dict(files["resampler"]), str(files["resampler"]))
        load_extra_state(unet, blocks, "ip", read_state_dict(files["ip_kv"]), str(files["ip_kv"]))
    load_extra_state(unet, blocks, "kv", read_state_dict(files["kv_projections"]), str(files["kv_projections"]))
    kv_config = configs["kv_encoder"]
    add_kv_encoder_lora(unet, blocks, kv_config["lora_rank"], kv_config.get("kv_lora_rank"))
    load_kv_encoder_lora(unet, read_state_dict(files["kv_lora"]), str(files["kv_lora"]))
    if "lcm_lora" in files:
        load_lcm_lora(unet, files["lcm_lora"])
    config = components_config(unet, configs["scheduler"], configs["resampler"], kv_config, configs["pipeline"])
    return Components(config=config, image_encoder=image_encoder, resampler=resampler, **parts)


def components_config(unet, scheduler: dict, resampler: dict, kv_encoder: dict, pipeline: dict) -> dict[str, Any]:
    """The ``Personalizer.config`` of loaded weights (pipeline defaults are the authors')."""
    return {
        "unet": dict(unet.config), "scheduler": scheduler, "resampler": resampler, "kv_encoder": kv_encoder,
        "pipeline": {"encoder_prompt": "A photo of a face", "face_size": 1024, **pipeline},
    }  # fmt: skip


# ------------------------------------------------------------------ saving
# Components that training never changes: a checkpoint may name them where they already are instead of copying them.
FROZEN = ("sdxl", "image_encoder", "lcm_lora", "vae", "faces")


def save(
    components: Components, faces_dir: Path | None, root: str | Path, linked: ModelLayout | None = None
) -> ModelLayout:
    """Write every module in safetensors under ``root`` with an ``lcmla.json`` naming them; return it validated.

    The directory is written beside ``root`` and swapped in when complete (an existing ``root`` is replaced as a
    whole), so a failure or a kill leaves the old directory as it was; an ``OSError`` is a :class:`WriteError`.

    ``linked``: the directory this model was loaded from, when the :data:`FROZEN` components still hold exactly its
    weights (as in a training checkpoint): those are named by absolute path, with their recorded hashes, not written.
    """
    root = Path(root).expanduser()
    links = {name: c for name, c in linked.components.items() if name in FROZEN} if linked is not None else {}
    if "faces" in links and (faces_dir is None or links["faces"].path.resolve() != Path(faces_dir).resolve()):
        del links["faces"]  # the model was given another face pack than its directory's
    target = root.resolve()
    inside = sorted(c.path for c in links.values() if c.path.resolve() == target or target in c.path.resolve().parents)
    if inside:
        raise ValueError(f"path: {root} holds {inside[0]}, which a linked save names; replacing {root} would remove it: "
                         "save elsewhere, or without linking")  # fmt: skip
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise ValueError(f"path: {root} is a folder with other files (no {MANIFEST}); a save replaces its folder "
                         "whole: choose a new or empty folder")  # fmt: skip
    with atomic_directory(root, failures=(SafetensorError,)) as staging:
        _write(components, faces_dir, staging, links, linked)
    return validate(root, verify=False)  # its records were made from these very files


def _write(components: Components, faces_dir: Path | None, root: Path, links: dict[str, Component],
           linked: ModelLayout | None) -> None:  # fmt: skip
    unet, config = components.unet, components.config
    blocks = install_lookahead_processors(unet)
    names: dict[str, Any] = {name: {"path": str(c.path.resolve()), **c.options} for name, c in links.items()}
    if "sdxl" not in links:
        _save_sdxl(components, root / "sdxl")
        names["sdxl"] = "sdxl"
    if "image_encoder" not in links:
        components.image_encoder.save_pretrained(root / "image_encoder")
        names["image_encoder"] = "image_encoder"

    _write_json(root / "adapter" / "config.json", config["resampler"])
    _save(components.resampler.state_dict(), root / "adapter" / "resampler.safetensors")
    _save(extra_state(unet, blocks, "ip"), root / "adapter" / "ip_kv.safetensors")
    _write_json(root / "kv_encoder" / "config.json", config["kv_encoder"])
    _save(extra_state(unet, blocks, "kv"), root / "kv_encoder" / "kv_projections.safetensors")
    _save(kv_encoder_lora_state(unet), root / "kv_encoder" / "lora.safetensors")
    names |= {"adapter": "adapter", "kv_encoder": "kv_encoder"}
    if has_adapter(unet, LCM_ADAPTER) and "lcm_lora" not in links:
        save_lcm_lora(unet, root / "lcm_lora")
        names["lcm_lora"] = "lcm_lora"
    if faces_dir is not None and "faces" not in links:
        (root / "faces").mkdir(exist_ok=True)
        for onnx_file in Path(faces_dir).glob("*.onnx"):
            shutil.copy2(onnx_file, root / "faces" / onnx_file.name)
        names["faces"] = "faces"
    pipeline = {k: v for k, v in config["pipeline"].items() if k in ("encoder_prompt", "face_size", "has_kv_encoder")}
    write_manifest(root, names, pipeline, _linked_records(linked, links.values()))


def _linked_records(linked: ModelLayout | None, frozen: Iterable[Component]) -> dict[str, dict]:
    """The base directory's records of the linked components' files, by the absolute paths that label them now."""
    if linked is None:
        return {}
    roots = [component.path.resolve() for component in frozen]
    records = {}
    for label, record in linked.manifest.get("files", {}).items():
        path = (linked.root / label).resolve()
        if any(path == root or root in path.parents for root in roots):
            records[path.as_posix()] = record
    return records


def _save_sdxl(components: Components, sdxl: Path) -> None:
    """The SDXL base in diffusers layout: the UNet's own weights (no LoRA, no LCM-Lookahead projections), VAE, text
    encoders, tokenizers, scheduler."""
    unet, config = components.unet, components.config
    (sdxl / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(sdxl / "unet")
    _save(base_unet_state(unet), sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    components.vae.save_pretrained(sdxl / "vae")
    for part in DIFFUSERS_PARTS:
        config_file = sdxl / part / "config.json"
        _write_json(config_file, {k: v for k, v in read_json(config_file).items() if k != SOURCE_PATH_KEY})
    for name in ("tokenizer", "tokenizer_2"):
        # Encoding leaves its padding and truncation on the fast tokenizer's backend, which tokenizer.json would
        # record; each call sets its own, so clearing them makes a used model save the same bytes as a fresh one.
        backend = getattr(components, name).backend_tokenizer
        backend.no_padding()
        backend.no_truncation()
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(components, name).save_pretrained(sdxl / name)
    _write_json(sdxl / "scheduler" / "scheduler_config.json", config["scheduler"])


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_json(path, value, indent=1, sort_keys=True, default=str)


def write_manifest(
    root: Path, components: dict[str, Any], pipeline: dict[str, Any], known: dict[str, dict] | None = None
) -> dict[str, Any]:
    """Write ``lcmla.json`` and record size, hash and dtype of every weight file the components name.

    ``known``: records already made for files outside ``root`` (by their absolute labels); one whose size still
    matches is reused instead of hashing the file again. Files under ``root`` are always hashed."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "pipeline": pipeline, "components": components}
    layout = ModelLayout(root, manifest, _components(root, manifest), {}, {}, [])
    weight_suffixes = (".safetensors", ".onnx", *PICKLE_SUFFIXES)
    manifest["files"] = {}
    for path in sorted(p for c in layout.components.values() for p in ([c.path] if c.path.is_file() else c.path.rglob("*"))):
        if path.is_file() and path.suffix in weight_suffixes:
            label, size = layout.label(path), path.stat().st_size
            record = (known or {}).get(label, {}) if Path(label).is_absolute() else {}
            if record.get("bytes") != size or "sha256" not in record:
                record = {"sha256": sha256_file(path), "bytes": size}
                if path.suffix == ".safetensors":
                    dtypes = {dtype for _, dtype in file_header(path).values()}
                    if len(dtypes) == 1:
                        record["dtype"] = dtypes.pop()
            manifest["files"][label] = record
    _write_json(root / MANIFEST, manifest)
    return manifest


def describe(root: str | Path) -> list[tuple[str, str, str, str]]:
    """Rows ``(component, path, dtypes, size or problem)`` for ``lcmla info``; never raises for a missing file (the
    manifest itself must fit :data:`MANIFEST_SCHEMA`)."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    rows = []
    for name in REQUIRED + OPTIONAL:
        entry = manifest["components"].get(name)
        if not entry:  # an optional component (required ones are in every valid manifest)
            rows.append((name, "-", "-", "not present"))
            continue
        path = _component_path(root, name, entry)
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
