"""Networks compiled whole by ``torch.compile`` (Inductor), with the one set of Dynamo settings every compile and
every compiled call runs under. Building the compiled code once and loading it: :mod:`lcmla_sdk.engines.compiled`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

# Dynamo's cache entries per code object: sizes 1 and >= 2 of every network and image size used in one process.
RECOMPILE_LIMIT = 64
# Dynamo's own work (the traced bytecode and its guards) kept with Inductor's caches, so that a process loading
# them skips tracing too (each full-size network takes 10-20 s to trace). PyTorch calls it experimental; it drops
# guards on object identity, which holds here: a compiled forward is only reused for networks of its own class.
PRECOMPILE = hasattr(torch._dynamo.config, "caching_precompile")


def compile_settings():
    """The Dynamo settings of lcmla's compiles, their calls and the saving of their caches."""
    settings: dict[str, Any] = {"cache_size_limit": RECOMPILE_LIMIT}
    if PRECOMPILE:
        settings["caching_precompile"] = True
    return torch._dynamo.config.patch(**settings)


def saved_caches() -> bytes:
    """What this process compiled (Inductor, AOTAutograd, Triton and Dynamo's entries), for
    ``torch.compiler.load_cache_artifacts`` in another process; empty when nothing was compiled."""
    with compile_settings():
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
        with compile_settings():
            self.compiled = torch.compile(network)

    def forward(self, *args: Any) -> Any:
        for value in _tensors(args):
            if value.dim() and value.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        with compile_settings():
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
