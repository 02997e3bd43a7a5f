"""The SDK model a run trains on: loaded frozen in the weight dtype, and checked against what the run asks of it."""

from __future__ import annotations

import torch

from lcmla_sdk.pipeline import Personalizer

from .config import ConfigError


def load_model(
    name: str, device: torch.device, dtype: torch.dtype, *, lookahead: bool, max_timestep: int, resolution: int
) -> Personalizer:
    """``name`` (a preset or a model directory) on ``device``; a :class:`ConfigError` names the key the model does
    not suit: ``lookahead`` (a lookahead step) needs an LCM-LoRA, ``max_timestep`` at most the scheduler's training
    timesteps, ``resolution`` a multiple of the model's size multiple."""
    try:
        model = Personalizer.from_pretrained(name, device=device, dtype=dtype)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    if lookahead and not model.has_lcm:
        raise ConfigError("lookahead.every: the model has no LCM-LoRA; add one, or set lookahead.every to 0")
    train_steps = model.config["scheduler"]["num_train_timesteps"]
    if max_timestep > train_steps:
        raise ConfigError(
            f"lookahead.max_timestep: at most {train_steps} (the scheduler's training timesteps), got {max_timestep}"
        )
    if resolution % model.size_multiple:
        raise ConfigError(f"data.resolution: must be a multiple of {model.size_multiple}, got {resolution}")
    # Training trains the K/V-encoder, so checkpoints of a no-K/V model (lcmla convert) generate with K/V.
    model.config["pipeline"].pop("has_kv_encoder", None)
    return model
