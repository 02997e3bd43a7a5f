"""Saving a model directory: every module in safetensors under the directory, with the index ``lcmla.json`` naming
them and recording the size, sha256 and dtype of every weight file. ``save`` writes the whole directory beside its
place and swaps it in (:mod:`lcmla_sdk.atomic`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..atomic import atomic_directory, write_json
from ..integrity import sha256_file
from ..lora import LCM_ADAPTER, has_adapter
from ..presets import Components
from ..schema import read_json
from ..weights import PICKLE_SUFFIXES, save_lcm_lora
from ..wiring import base_unet_state, lookahead_weights
from .checks import validate
from .format import DIFFUSERS_PARTS, FORMAT, FORMAT_VERSION, INDEX, Component, ModelLayout, file_header, read_components

# Where diffusers records the folder a model was loaded from; left out of saved configs so that a directory's
# fingerprint does not depend on where its weights came from.
SOURCE_PATH_KEY = "_name_or_path"
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
    if root.is_dir() and any(root.iterdir()) and not (root / INDEX).is_file():
        raise ValueError(f"path: {root} is a folder with other files (no {INDEX}); a save replaces its folder "
                         "whole: choose a new or empty folder")  # fmt: skip
    with atomic_directory(root, failures=(SafetensorError,)) as staging:
        _write(components, faces_dir, staging, links, linked)
    return validate(root, verify=False)  # its records were made from these very files


def _write(components: Components, faces_dir: Path | None, root: Path, links: dict[str, Component],
           linked: ModelLayout | None) -> None:  # fmt: skip
    unet, config = components.unet, components.config
    added, base = lookahead_weights(unet), base_unet_state(unet)
    names: dict[str, Any] = {name: {"path": str(c.path.resolve()), **c.options} for name, c in links.items()}
    if "sdxl" not in links:
        _save_sdxl(components, base, root / "sdxl")
        names["sdxl"] = "sdxl"
    if "image_encoder" not in links:
        components.image_encoder.save_pretrained(root / "image_encoder")
        names["image_encoder"] = "image_encoder"

    _write_json(root / "adapter" / "config.json", config["resampler"])
    _save(components.resampler.state_dict(), root / "adapter" / "resampler.safetensors")
    _save(added.ip_kv, root / "adapter" / "ip_kv.safetensors")
    _write_json(root / "kv_encoder" / "config.json", config["kv_encoder"])
    _save(added.kv_projections, root / "kv_encoder" / "kv_projections.safetensors")
    _save(added.kv_lora, root / "kv_encoder" / "lora.safetensors")
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
    write_index(root, names, pipeline, _linked_records(linked, links.values()))


def _linked_records(linked: ModelLayout | None, frozen: Iterable[Component]) -> dict[str, dict]:
    """The base directory's records of the linked components' files, by the absolute paths that label them now."""
    if linked is None:
        return {}
    roots = [component.path.resolve() for component in frozen]
    records = {}
    for label, record in linked.index.get("files", {}).items():
        path = (linked.root / label).resolve()
        if any(path == root or root in path.parents for root in roots):
            records[path.as_posix()] = record
    return records


def _save_sdxl(components: Components, unet_state: dict[str, torch.Tensor], sdxl: Path) -> None:
    """The SDXL base in diffusers layout: the UNet's own weights (no LoRA, no LCM-Lookahead projections), VAE, text
    encoders, tokenizers, scheduler."""
    unet, config = components.unet, components.config
    (sdxl / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(sdxl / "unet")
    _save(unet_state, sdxl / "unet" / "diffusion_pytorch_model.safetensors")
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


def write_index(
    root: Path, components: dict[str, Any], pipeline: dict[str, Any], known: dict[str, dict] | None = None
) -> dict[str, Any]:
    """Write the index ``lcmla.json`` and record size, hash and dtype of every weight file the components name.

    ``known``: records already made for files outside ``root`` (by their absolute labels); one whose size still
    matches is reused instead of hashing the file again. Files under ``root`` are always hashed."""
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "pipeline": pipeline, "components": components}
    layout = ModelLayout(root, index, read_components(root, index), {}, {}, [])
    weight_suffixes = (".safetensors", ".onnx", *PICKLE_SUFFIXES)
    index["files"] = {}
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
            index["files"][label] = record
    _write_json(root / INDEX, index)
    return index


