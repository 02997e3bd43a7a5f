"""Atomic training checkpoints and exact resume.

``<output_dir>/checkpoints/step-0000500/`` holds the model directory (what ``Personalizer.from_pretrained`` reads)
and ``trainer_state/``: the fp32 trainables, optimiser, LR schedule, gradient scaler, each rank's RNG states, and
``state.json`` (step = data position, skipped files, config, and the sha256 of the trainables and optimiser files). A
checkpoint is written under a hidden temporary name and renamed into place only when complete, so a run killed while
writing keeps its previous checkpoint. A checkpoint that cannot be read back (damaged files, hashes that do not match
``state.json``) is reported as broken, with the previous intact checkpoint to resume from instead.

Nothing here unpickles: tensors go through safetensors, and optimiser/scheduler state through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lcmla_sdk.atomic import fsync_tree, replace_directory, write_error, write_text
from lcmla_sdk.errors import LcmlaError
from lcmla_sdk.integrity import sha256_file

CHECKPOINTS = "checkpoints"
STATE_DIR = "trainer_state"
LATEST = "latest"
STATE_VERSION = 1
HASHED = ("trainables.safetensors", "optimizer.pt")  # trainer-state files whose sha256 state.json records
# What reading a damaged checkpoint file raises (safetensors, weights-only torch.load, JSON, missing keys).
DAMAGE = (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError,
          AttributeError)  # fmt: skip


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
    path = directory / f"rng-rank{rank}.safetensors"
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        raise write_error(path, error) from None


def read_rng_state(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"resume: {path} is missing (was the run saved with another number of processes?)")
    try:  # everything is read before any generator is set, so a damaged file changes nothing
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
            cpu = handle.get_tensor("torch_cpu")
            cuda = [handle.get_tensor(k) for k in sorted(k for k in handle.keys() if k.startswith("torch_cuda_"))]
        version, state, gauss_next = json.loads(metadata["python"])
        kind, keys, position, has_gauss, gauss = json.loads(metadata["numpy"])
    except DAMAGE as error:
        raise broken(directory.parent, f"{path.name}: {error}") from None
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((version, tuple(state), gauss_next))
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
    try:
        save_file({k: v.detach().float().contiguous() for k, v in trainables.items()}, str(directory / HASHED[0]))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "scaler": scaler_state},
                   directory / HASHED[1])  # fmt: skip
    except (SafetensorError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        raise write_error(directory, error) from None
    files = {name: sha256_file(directory / name) for name in HASHED}
    write_text(directory / "state.json", json.dumps({"version": STATE_VERSION, **state, "files": files}, indent=1))


def read_trainer_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainables, {optimizer, scheduler, scaler}, state.json) of a checkpoint, its files checked against the hashes
    ``state.json`` records; a damaged checkpoint is a :class:`CheckpointError` offering the previous intact one."""
    directory = checkpoint / STATE_DIR
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"resume: {checkpoint} is not a complete training checkpoint (no {STATE_DIR}/state.json)")
    state = _read_state(checkpoint)
    try:
        trainables = load_file(str(directory / HASHED[0]))
        optimisation = torch.load(directory / HASHED[1], map_location="cpu", weights_only=True)
    except DAMAGE as error:
        raise broken(checkpoint, str(error).splitlines()[0]) from None
    return trainables, optimisation, state


def _read_state(checkpoint: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after checking the recorded hashes (older checkpoints record none)."""
    directory = checkpoint / STATE_DIR
    try:
        state = json.loads((directory / "state.json").read_bytes().decode("utf-8"))
        version, recorded = state.get("version"), state.get("files", {})
        if not isinstance(state.get("step"), int) or not isinstance(state.get("world_size"), int) or not isinstance(recorded, dict) or set(recorded) - set(HASHED):
            raise ValueError("expected an object with integers 'step' and 'world_size' and 'files' hashes")
        found = {name: sha256_file(directory / name) for name in recorded}
    except DAMAGE as error:
        raise broken(checkpoint, f"{STATE_DIR}/state.json: {error}") from None
    if version != STATE_VERSION:
        raise CheckpointError(f"resume: {checkpoint} has trainer-state version {version}, expected {STATE_VERSION}")
    for name, expected in recorded.items():
        if found[name] != expected:
            raise broken(checkpoint, f"{STATE_DIR}/{name}: sha256 {found[name]}, but state.json records {expected}")
    return state


def broken(checkpoint: Path, reason: str) -> CheckpointError:
    """The error for a checkpoint that cannot be read back, naming the previous intact checkpoint, if any."""
    earlier = [p for p in sorted(checkpoint.parent.glob("step-*"), reverse=True) if p.name < checkpoint.name]
    previous = next((p for p in earlier if _intact(p)), None)
    offer = (f"the previous complete checkpoint is {previous}: resume from it with --resume-from {previous}"
             if previous is not None else "there is no earlier complete checkpoint to resume from")  # fmt: skip
    return CheckpointError(f"resume: checkpoint {checkpoint} is broken ({reason}); {offer}")


def _intact(checkpoint: Path) -> bool:
    if not (checkpoint / STATE_DIR / "state.json").is_file():
        return False
    try:
        _read_state(checkpoint)
    except CheckpointError:
        return False
    return True


def staging_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (hidden, never taken for a checkpoint)."""
    return checkpoint_path(output_dir, step).with_name(f".tmp-step-{step:07d}")


def begin(output_dir: str | Path, step: int, write_model: Callable[[Path], Any] | None = None) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (a leftover from a killed write is removed):
    ``write_model(staging)`` writes the model directory there (it makes the folder), then ``trainer_state/`` is added."""
    staging = staging_path(output_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    if write_model is not None:
        write_model(staging)
    try:
        (staging / STATE_DIR).mkdir(parents=True)
    except OSError as error:
        raise write_error(staging / STATE_DIR, error) from None
    return staging


def commit(staging: Path, output_dir: str | Path, step: int, keep: int) -> Path:
    """Move the finished checkpoint into place, point ``latest`` at it, and drop the oldest beyond ``keep``."""
    final = checkpoint_path(output_dir, step)
    try:
        fsync_tree(staging)
        replace_directory(staging, final)  # the same step saved again (a resumed run) is swapped in whole
    except OSError as error:
        raise write_error(final, error) from None
    write_text(final.parent / LATEST, final.name)
    if keep:
        for old in sorted(final.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (hidden temporary directories never count)."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if name.startswith("step-") and (root / name / STATE_DIR / "state.json").is_file() and "/" not in name:
            return root / name
    complete = [p for p in sorted(root.glob("step-*")) if (p / STATE_DIR / "state.json").is_file()]
    return complete[-1] if complete else None
