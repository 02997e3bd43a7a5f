"""Validation of a model directory before any heavy load: the index, every named file, every weight's key, shape and
dtype (from file headers against meta-device builds of the configs), and the sha256 of every recorded file that
loading reads (streamed and cached: :mod:`lcmla_sdk.integrity`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..errors import ModelFilesError
from ..faces import check_face_pack
from ..integrity import verify_file
from ..schema import read_json
from ..text import check_tokenizer_files
from ..weights import LORA_FILE, check_shapes, shapes
from ..wiring import base_unet_state, lookahead_weights, wire_unet
from .format import (
    DIFFUSERS_PARTS,
    FLOAT_DTYPES,
    INDEX,
    TOKENIZER_FILES,
    TRANSFORMERS_PARTS,
    Component,
    ModelLayout,
    canonical_json,
    file_header,
    read_components,
    read_index,
    weight_file,
    with_shards,
)

# CLIP checkpoints written by older transformers carry this buffer; current models rebuild it.
IGNORED_SUFFIXES = ("position_ids",)


@dataclass
class _Found:
    """What validation has found so far: configs by part, weight files by part, every file loading reads."""

    configs: dict[str, Any]
    weights: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def add(self, part: str, folder: Path, stem: str, variant: str | None) -> None:
        """A diffusers or transformers folder: its ``config.json`` and weight file (or sharded index and shards)."""
        self.configs[part] = read_json(folder / "config.json")
        self.weights[part] = weight_file(folder, stem, variant)
        self.files += [folder / "config.json", *with_shards(self.weights[part])]


def validate(root: str | Path, verify: bool = True) -> ModelLayout:
    """Check the index, every named file, every weight's key, shape and dtype, and (``verify``) the sha256 of every
    recorded file that loading reads; load no weights."""
    root = Path(root).expanduser()
    index = read_index(root)
    components = read_components(root, index)
    found = _Found({"pipeline": index.get("pipeline", {})}, files=[root / INDEX])
    _find_sdxl(found, components)
    image_encoder = components["image_encoder"]
    found.add("image_encoder", image_encoder.path, "model", image_encoder.options.get("variant"))
    kv_dir = components["kv_encoder"].path
    found.configs["kv_encoder"] = read_json(kv_dir / "config.json")
    found.weights |= {"kv_projections": kv_dir / "kv_projections.safetensors", "kv_lora": kv_dir / "lora.safetensors"}
    found.files += [kv_dir / "config.json", found.weights["kv_projections"], found.weights["kv_lora"]]
    _find_adapter(found, components["adapter"])
    if "lcm_lora" in components:
        path = components["lcm_lora"].path
        found.weights["lcm_lora"] = path / LORA_FILE if path.is_dir() else path
        found.files.append(found.weights["lcm_lora"])
    if "faces" in components:
        check_face_pack(components["faces"].path)
        found.files += sorted(components["faces"].path.glob("*.onnx"))

    missing = [str(p) for p in found.files if not p.is_file()]
    if missing:
        raise ModelFilesError(f"missing files: {', '.join(missing[:5])}")
    layout = ModelLayout(root, index, components, found.configs, found.weights, found.files)
    _check_weights(layout)
    records = index.get("files", {})
    gone = [label for label in records if not layout.path(label).is_file()]
    if gone:
        raise ModelFilesError(f"{root / INDEX}: files[{gone[0]!r}]: the recorded file {layout.path(gone[0])} is missing")
    if not verify:
        return layout
    verified = {path: verify_file(path, records[layout.label(path)]["sha256"], root / INDEX)
                for path in layout.files if layout.label(path) in records}  # fmt: skip
    return ModelLayout(root, index, components, found.configs, found.weights, found.files, verified)


def _find_sdxl(found: _Found, components: dict[str, Component]) -> None:
    """The SDXL base in diffusers layout (with the VAE override, if any): configs, weights, scheduler, tokenizers."""
    sdxl = components["sdxl"]
    variant = sdxl.options.get("variant")
    folders = {part: sdxl.path / part for part in (*DIFFUSERS_PARTS, *TRANSFORMERS_PARTS)}
    if "vae" in components:
        folders["vae"] = components["vae"].path
    for part, folder in folders.items():
        found.add(part, folder, DIFFUSERS_PARTS.get(part) or TRANSFORMERS_PARTS[part], variant)
    found.configs["scheduler"] = read_json(sdxl.path / "scheduler" / "scheduler_config.json")
    found.files.append(sdxl.path / "scheduler" / "scheduler_config.json")
    for part in ("tokenizer", "tokenizer_2"):
        files = [sdxl.path / part / name for name in TOKENIZER_FILES if (sdxl.path / part / name).is_file()]
        if not any(p.name == "tokenizer.json" for p in files) and len(files) < 2:
            raise ModelFilesError(f"{sdxl.path / part}: missing CLIP tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
        found.files += files
        check_tokenizer_files(sdxl.path / part)


def _find_adapter(found: _Found, adapter: Component) -> None:
    """lcmla's adapter folder, or an original IP-Adapter file (its resampler config read from the file at load)."""
    if adapter.options.get("format") == "ip-adapter":
        found.weights["ip_adapter"] = adapter.path
        found.files.append(adapter.path)
        if "resampler" in adapter.options:
            found.configs["resampler"] = adapter.options["resampler"]
        return
    found.configs["resampler"] = read_json(adapter.path / "config.json")
    found.weights |= {"resampler": adapter.path / "resampler.safetensors", "ip_kv": adapter.path / "ip_kv.safetensors"}
    found.files += [adapter.path / "config.json", found.weights["resampler"], found.weights["ip_kv"]]


def _check_weights(layout: ModelLayout) -> None:
    configs, files = layout.configs, layout.weight_files
    unet_shapes = _unet_file_shapes(canonical_json(configs["unet"]), canonical_json(configs["kv_encoder"]))
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


def _check_file(
    layout: ModelLayout, path: Path, expected: dict[str, tuple], ignore_unexpected: tuple[str, ...] = ()
) -> None:
    header = file_header(path)
    found = {k: shape for k, (shape, _) in header.items() if not k.endswith(ignore_unexpected) or k in expected}
    check_shapes(expected, found, str(path))
    record = layout.index.get("files", {}).get(layout.label(path), {})
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
        raise ModelFilesError(f"{path}: {path.stat().st_size} bytes, but {INDEX} records {record['bytes']}")


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple]:
    with torch.device("meta"):
        return shapes(build().state_dict())


@functools.lru_cache(maxsize=4)
def _unet_file_shapes(unet_config: str, kv_config: str) -> dict[str, dict[str, tuple]]:
    """Keys and shapes of every file the shared UNet loads, from a meta-device build wired for LCM-Lookahead.

    Cached by the configs' JSON text: peft's LoRA injection makes this the slowest part of validation.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(unet_config))
        wire_unet(unet, json.loads(kv_config))
    added = lookahead_weights(unet)
    return {
        "unet": shapes(base_unet_state(unet)), "kv_projections": shapes(added.kv_projections),
        "kv_lora": shapes(added.kv_lora), "ip_kv": shapes(added.ip_kv),
    }  # fmt: skip
