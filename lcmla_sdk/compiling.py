"""Networks compiled whole by ``torch.compile`` (Inductor): lazily at each new call shape, or ahead of time at
fixed call signatures, saved one file each and loaded without tracing. Building them once into a folder and loading
it: :mod:`lcmla_sdk.engines.compiled`.

Why ahead of time (Dynamo's ``aot_compile``), measured on an H200 with torch 2.11 (``benchmarks/compile_probe.py``):
a fresh process with an empty Inductor cache loads the full-size K/V-encoder's function in 3.2 s and the LCM
denoiser's in 3.3 s, and runs them at the speed of a lazy compile (19.2 and 23.8 ms), where loading Inductor's caches
still left Dynamo to trace each network again on its first call (tens of seconds). Dynamo's ``caching_precompile``
failed on that torch (``assert check_fn.guards_state is not None``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
from torch import nn

from .cuda_graphs import say_once

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


def call_signature(args: Sequence[Any]) -> tuple:
    """What a function compiled ahead of time is specialised to: every tensor argument's shape, strides, dtype and
    device type, and the value of every other argument."""
    return tuple((tuple(v.shape), v.stride(), str(v.dtype), v.device.type) if isinstance(v, torch.Tensor) else repr(v)
                 for v in _leaves(args))  # fmt: skip


class AheadOfTime:
    """Networks' functions compiled ahead of time, one file per network and call signature
    (``aot-NETWORK-SIGNATURE.bin`` in ``folder``). ``files``: the names to load from, each on the first call with
    its signature; ``record=True`` (a build): a call with no file compiles its function and saves it there.

    The functions keep no guards (a module's identity cannot be saved); the signature checked here stands in for
    them. Parameters are arguments of the function, so it runs on any instance of the same model. A saved function
    is code (pickled Python and GPU kernels): load only folders built on machines you trust."""

    def __init__(self, folder: str | Path, files: Iterable[str] = (), record: bool = False) -> None:
        self.folder, self.record = Path(folder), record
        self._files = set(files)
        # By network name and call signature: every call asks, so each is looked up once (a miss too).
        self._functions: dict[tuple[str, tuple], Any] = {}

    @staticmethod
    def file_name(network: str, signature: tuple) -> str:
        return f"aot-{network}-{hashlib.sha256(repr(list(signature)).encode()).hexdigest()[:16]}.bin"

    def function(self, name: str, network: nn.Module, args: Sequence[Any]) -> Any | None:
        """The function for ``network`` (called ``name``) at ``args``' signature, or ``None`` when there is none."""
        key = (name, call_signature(args))
        if key not in self._functions:
            file = self.file_name(*key)
            with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default on torch 2.11
                if file in self._files:
                    # Loading runs the kernels' module code. On a GPU the Triton kernels come bundled with the
                    # function, yet the first one would start Inductor's pool of compile workers (one per core, each
                    # importing torch); with one compile thread they load in this process and no start-up competes
                    # with the first calls for the host. (On a CPU the C++ kernels compile here, one at a time.)
                    with open(self.folder / file, "rb") as saved, torch._inductor.config.patch(compile_threads=1):
                        self._functions[key] = torch.compiler.load_compiled_function(saved)
                elif self.record:
                    self._functions[key] = self._compile(network, args, self.folder / file)
                else:
                    self._functions[key] = None
        return self._functions[key]

    @staticmethod
    def _compile(network: nn.Module, args: Sequence[Any], path: Path) -> Any:
        keep_no_guards = {"guard_filter_fn": lambda guards: [False] * len(guards)}
        function = torch.compile(network, fullgraph=True, dynamic=False, options=keep_no_guards).forward.aot_compile(
            (tuple(args), {})
        )
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel build jobs may record one function
        function.save_compiled_function(str(temporary))
        temporary.replace(path)
        return function


class CompiledNetwork(nn.Module):
    """A network compiled whole, with the network's own call signature: by the function ``ahead`` has for a call's
    signature, or else lazily, where batch size 1 gets graphs of its own and larger batches share one whose batch
    dimension is symbolic. ``name`` names the network's functions in ``ahead``."""

    def __init__(self, network: nn.Module, name: str, ahead: AheadOfTime | None = None) -> None:
        super().__init__()
        self.network, self.name, self.ahead = network, name, ahead
        self.compiled = torch.compile(network)

    def forward(self, *args: Any) -> Any:
        function = self.ahead.function(self.name, self.network, args) if self.ahead is not None else None
        if function is not None:
            return function(self.network, *args)
        if self.ahead is not None:
            say_once(f"compiled networks: none built for {self.name} at this call's shapes; compiling it (minutes)")
        for value in _leaves(args):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > 1:
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


def _leaves(values: Sequence[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _leaves(value)
        else:
            yield value
