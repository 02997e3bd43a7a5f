"""Networks compiled whole by ``torch.compile`` (Inductor), and the caches of what a process compiled, saved and
loaded. Building the compiled code once into a folder and loading it: :mod:`lcmla_sdk.engines.compiled`.

Dynamo's own work (tracing, 10-20 s per full-size network on a loaded shape's first call) is not kept: its
``caching_precompile`` (experimental) failed on torch 2.11 + CUDA with ``assert check_fn.guards_state is not None``
(H100, 2026-12-06), although it worked on torch 2.13 on a CPU."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

# Dynamo's cache entries per code object: sizes 1 and >= 2 of every network and image size used in one process.
RECOMPILE_LIMIT = 64


def saved_caches() -> bytes:
    """What this process compiled (Inductor, AOTAutograd and Triton caches), for
    ``torch.compiler.load_cache_artifacts`` in another process; empty when nothing was compiled."""
    artifacts = torch.compiler.save_cache_artifacts()
    return artifacts[0] if artifacts else b""


def load_caches(blob: bytes) -> None:
    """Make what :func:`saved_caches` gave available to this process's compiles (before they are made)."""
    if blob:
        torch.compiler.load_cache_artifacts(blob)


class CompiledNetwork(nn.Module):
    """A network compiled whole, with the network's own call signature. Batch size 1 gets graphs of its own;
    larger batches share one whose batch dimension is symbolic."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.compiled = torch.compile(network)

    def forward(self, *args: Any) -> Any:
        for value in _tensors(args):
            if value.dim() and value.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        with torch._dynamo.config.patch(cache_size_limit=RECOMPILE_LIMIT):
            return self.compiled(*args)


class VaeDecode(nn.Module):
    """The VAE decode as a network: ``torch.compile`` of the VAE itself compiles ``forward``, not ``decode``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def _tensors(values: Sequence[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)
