"""Atomic training checkpoints and exact resume.

``<output_dir>/checkpoints/step-0000500/`` holds the model directory (what ``Personalizer.from_pretrained`` reads)
and ``trainer_state/``: the fp32 trainables, optimiser, LR schedule, gradient scaler, each rank's RNG states, and
``state.json`` (step = data position, skipped files, config). A checkpoint is written under a hidden temporary name
and renamed into place only when complete, so a run killed while writing keeps its previous checkpoint.

Nothing here unpickles: tensors go through safetensors, and optimiser/scheduler state through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lcmla_sdk.errors import LcmlaError

CHECKPOINTS = "checkpoints"
STATE_DIR = "trainer_state"
LATEST = "latest"
STATE_VERSION = 1


class CheckpointError(LcmlaError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def write_rng_state(directory: Path, rank: int) -> None:
    """This process's global RNG states (torch CPU/CUDA as tensors; Python and numpy as JSON metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    metadata = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([kind, keys.tolist(), position, has_gauss, gauss]),
    }
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"), metadata=metadata)


def read_rng_state(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"resume: {path} is missing (was the run saved with another number of processes?)")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        torch.set_rng_state(handle.get_tensor("torch_cpu"))
        cuda = sorted(k for k in handle.keys() if k.startswith("torch_cuda_"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([handle.get_tensor(k) for k in cuda])
    version, state, gauss_next = json.loads(metadata["python"])
    random.setstate((version, tuple(state), gauss_next))
    kind, keys, position, has_gauss, gauss = json.loads(metadata["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))


def write_trainer_state(
    directory: Path,
    trainables: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    state: dict[str, Any],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in trainables.items()}, str(directory / "trainables.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "scaler": scaler_state},
               directory / "optimizer.pt")  # fmt: skip
    _write_text(directory / "state.json", json.dumps({"version": STATE_VERSION, **state}, indent=1))


def read_trainer_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainables, {optimizer, scheduler, scaler}, state.json) of a checkpoint."""
    directory = checkpoint / STATE_DIR
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"resume: {checkpoint} is not a complete training checkpoint (no {STATE_DIR}/state.json)")
    state = json.loads((directory / "state.json").read_text())
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"resume: {checkpoint} has trainer-state version {state.get('version')}, expected 1")
    trainables = load_file(str(directory / "trainables.safetensors"))
    optimisation = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    return trainables, optimisation, state


def staging_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (hidden, never taken for a checkpoint)."""
    return checkpoint_path(output_dir, step).with_name(f".tmp-step-{step:07d}")


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (a leftover from a killed write is removed)."""
    staging = staging_path(output_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    (staging / STATE_DIR).mkdir(parents=True)
    return staging


def commit(staging: Path, output_dir: str | Path, step: int, keep: int) -> Path:
    """Move the finished checkpoint into place, point ``latest`` at it, and drop the oldest beyond ``keep``."""
    final = checkpoint_path(output_dir, step)
    if final.exists():  # the same step saved again (e.g. a resumed run re-saving its last step)
        shutil.rmtree(final)
    _fsync_tree(staging)
    os.replace(staging, final)
    _write_text(final.parent / LATEST, final.name)
    if keep:
        for old in sorted(final.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (hidden temporary directories never count)."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_DIR / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(root.glob("step-*")) if (p / STATE_DIR / "state.json").is_file()]
    return complete[-1] if complete else None


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
