"""Validation of a model directory before any heavy load, on what :func:`.format.read_layout` read (every file
found, tokenizer files readable): every weight's key, shape and dtype (from the file headers) must fit meta-device
builds of the configs, a face pack must hold ONNX models, and every recorded file that loading reads must have its
recorded sha256 (streamed and cached: :mod:`lcmla_sdk.integrity`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

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
from ..weights import check_shapes
from ..wiring import lookahead_shapes
from .format import FLOAT_DTYPES, INDEX, ModelLayout, read_layout

# CLIP checkpoints written by older transformers carry this buffer; current models rebuild it.
IGNORED_SUFFIXES = ("position_ids",)
CLIP_PARTS = ("text_encoder", "text_encoder_2", "image_encoder")
# How each checked weight file's module is built from the configs (on the meta device: shapes only).
META_BUILDS: dict[str, Callable[[dict], torch.nn.Module]] = {
    "unet": lambda configs: UNet2DConditionModel.from_config(configs["unet"]),
    "vae": lambda configs: AutoencoderKL.from_config(configs["vae"]),
    "text_encoder": lambda configs: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    "text_encoder_2": lambda configs: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
    "image_encoder": lambda configs: CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])),
    "resampler": lambda configs: IPAdapterPlusImageProjection(**configs["resampler"]),
}


def validate(root: str | Path, verify: bool = True) -> ModelLayout:
    """Read the directory (:func:`.format.read_layout`: the index and every named file, which must exist) and
    :func:`check` it; load no weights."""
    layout = read_layout(Path(root).expanduser())
    return check(layout, verify)


def check(layout: ModelLayout, verify: bool = True) -> ModelLayout:
    """Check every weight's key, shape and dtype, the face pack, and (``verify``) the sha256 of every recorded file
    that loading reads; return ``layout`` with the hashes verified."""
    _check_weights(layout)
    if "faces" in layout.components:
        check_face_pack(layout.components["faces"].path)
    if not verify:
        return layout
    records, index_file = layout.index.get("files", {}), layout.root / INDEX
    verified = {path: verify_file(path, records[label]["sha256"], index_file)
                for path, label in layout.labels.items() if label in records}  # fmt: skip
    return replace(layout, verified=verified)


def _check_weights(layout: ModelLayout) -> None:
    """Every weight file's keys, shapes and dtypes (from its header) against a meta-device build of its config, and
    its size against its record."""
    records, expected = layout.index.get("files", {}), _expected_shapes(layout)
    for part, header in layout.headers.items():
        path = layout.weight_files[part]
        ignored = IGNORED_SUFFIXES if part in CLIP_PARTS else ()
        found = {k: shape for k, (shape, _) in header.items() if not k.endswith(ignored) or k in expected[part]}
        check_shapes(expected[part], found, str(path))
        record = records.get(layout.labels[path], {})
        wanted = record.get("dtype")
        wrong = sorted(k for k, (_, dtype) in header.items() if k in expected[part] and (dtype not in FLOAT_DTYPES.values() or (wanted and dtype != wanted)))
        if wrong:
            raise ModelFilesError(
                f"{path}: wrong dtype {header[wrong[0]][1]} for {len(wrong)} tensors (first: {wrong[0]}); "
                f"expected {wanted or 'a floating-point dtype'}"
            )
        # After the dtype check: a file rewritten in another dtype is reported as such, not as a size change.
        if "bytes" in record and record["bytes"] != path.stat().st_size:
            raise ModelFilesError(f"{path}: {path.stat().st_size} bytes, but {INDEX} records {record['bytes']}")


def _expected_shapes(layout: ModelLayout) -> dict[str, dict[str, tuple]]:
    """Keys and shapes of each weight file, by part: from meta-device builds of the configs, LCM-Lookahead's parts
    read from the same UNet build (:func:`~lcmla_sdk.wiring.lookahead_shapes`, no wiring)."""
    configs = layout.configs
    with torch.device("meta"):
        modules = {part: build(configs) for part, build in META_BUILDS.items() if part in layout.weight_files}
    expected = {part: {k: tuple(v.shape) for k, v in module.state_dict().items()} for part, module in modules.items()}
    return expected | lookahead_shapes(modules["unet"], configs["kv_encoder"])
