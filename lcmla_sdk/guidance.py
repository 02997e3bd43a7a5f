"""LCM-Lookahead's three-branch classifier-free guidance."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .defaults import DEFAULT_GUIDANCE


class Guidance(NamedTuple):
    """Weights of the three guidance directions (the authors' defaults: 3.0 / 2.0 / 2.0).

    ``no_kv``: text+image guidance without the encoder K/V; ``full``: conditional prediction with K/V;
    ``kv``: the unconditional prediction with K/V (identity without text).
    """

    no_kv: float = DEFAULT_GUIDANCE[0]
    full: float = DEFAULT_GUIDANCE[1]
    kv: float = DEFAULT_GUIDANCE[2]


def three_branch(
    nokv_uncond: torch.Tensor,
    nokv_cond: torch.Tensor,
    full_uncond: torch.Tensor,
    full_cond: torch.Tensor,
    weights: Guidance | torch.Tensor,
) -> torch.Tensor:
    """``e = u + w_nokv (c - u) + w_full (e_full(c) - u) + w_kv (e_full(u) - u)`` with ``u = e_nokv(uncond)``.

    ``weights``: a :class:`Guidance`, or its three values as a device tensor (so they change between calls of a
    captured CUDA graph). Without encoder K/V (``full_* = nokv_*``) this is plain CFG with scale ``w_nokv + w_full``.
    """
    no_kv, full, kv = weights[0], weights[1], weights[2]
    return (
        nokv_uncond
        + no_kv * (nokv_cond - nokv_uncond)
        + full * (full_cond - nokv_uncond)
        + kv * (full_uncond - nokv_uncond)
    )

