"""Every random draw of training, each from a generator derived from (seed, step, rank, purpose).

Deriving generators from counters instead of carrying one stream makes a resumed run draw exactly what the
uninterrupted run drew, and keeps each draw independent of how many draws came before it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch


def generator_for(seed: int, *key: int | str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``key`` (ints and purpose names) through numpy's SeedSequence."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def importance_weights(num_timesteps: int, alpha: float) -> torch.Tensor:
    """The authors' p(t) proportional to 1 - alpha cos(pi t / T) on t = 0..T-1, normalised (favours large t)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    weights = 1.0 - alpha * torch.cos(math.pi * t / num_timesteps)
    return weights / weights.sum()


def sample_timesteps(batch: int, num_timesteps: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``batch`` timesteps drawn with replacement from :func:`importance_weights`."""
    return torch.multinomial(importance_weights(num_timesteps, alpha), batch, replacement=True, generator=generator)


def lcm_lora_scale(seed: int, step: int, every: int, full_prob: float, minimum: float) -> float:
    """The LCM-LoRA scale for ``step``: 1 with probability ``full_prob``, else U(``minimum``, 1); one draw per block
    of ``every`` steps."""
    generator = generator_for(seed, step // every, "lcm_scale")
    full, uniform = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    return 1.0 if full < full_prob else minimum + (1.0 - minimum) * uniform


def drop_kv_tokens(kv: Sequence[torch.Tensor], probability: float, generator: torch.Generator) -> tuple:
    """Remove each appended token of each layer with ``probability``; K and V lose the same tokens, and the mask is
    the same for every sample of the batch (the authors' ``kv_drop_chance``)."""
    if probability <= 0:
        return tuple(kv)
    dropped = []
    for key, value in zip(kv[0::2], kv[1::2]):
        keep = torch.rand(key.shape[1], generator=generator) >= probability
        index = keep.nonzero().squeeze(1).to(key.device)
        dropped += [key.index_select(1, index), value.index_select(1, index)]
    return tuple(dropped)


def drop_image_tokens(
    cond: torch.Tensor, uncond: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Per sample, with ``probability``, the image tokens become the unconditional ones (``adapter_drop_chance``)."""
    drop = torch.rand(cond.shape[0], generator=generator) < probability
    return torch.where(drop.to(cond.device).view(-1, 1, 1), uncond, cond)
