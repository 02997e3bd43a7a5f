"""Validation of a model directory before any heavy load: every file its index names (:func:`.format.read_layout`)
must exist, tokenizers and face packs must be readable, every weight's key, shape and dtype (from file headers) must
fit meta-device builds of the configs, and every recorded file that loading reads must have its recorded sha256
(streamed and cached: :mod:`lcmla_sdk.integrity`)."""

from __future__ import annotations

import functools
import json
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
from ..text import check_tokenizer_files
from ..weights import check_shapes, shapes
from ..wiring import base_unet_state, lookahead_weights, wire_unet
from .format import FLOAT_DTYPES, INDEX, ModelLayout, canonical_json, file_header, read_layout

# CLIP checkpoints written by older transformers carry this buffer; current models rebuild it.
IGNORED_SUFFIXES = ("position_ids",)


def validate(root: str | Path, verify: bool = True) -> ModelLayout:
    """Check the index, every named file, every weight's key, shape and dtype, and (``verify``) the sha256 of every
    recorded file that loading reads; load no weights."""
    layout = read_layout(Path(root).expanduser())
    missing = [str(p) for p in layout.files if not p.is_file()]
    if missing:
        raise ModelFilesError(f"missing files: {', '.join(missing[:5])}")
    sdxl = layout.components["sdxl"].path
    for part in ("tokenizer", "tokenizer_2"):
        check_tokenizer_files(sdxl / part)
    if "faces" in layout.components:
        check_face_pack(layout.components["faces"].path)
    _check_weights(layout)
    records, index_file = layout.index.get("files", {}), layout.root / INDEX
    gone = [label for label in records if not layout.path(label).is_file()]
    if gone:
        raise ModelFilesError(f"{index_file}: files[{gone[0]!r}]: the recorded file {layout.path(gone[0])} is missing")
    if not verify:
        return layout
    verified = {path: verify_file(path, records[layout.label(path)]["sha256"], index_file)
                for path in layout.files if layout.label(path) in records}  # fmt: skip
    return replace(layout, verified=verified)


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
