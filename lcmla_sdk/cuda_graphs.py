"""CUDA-graph capture, one way for every graphed part (the sampling step, the text encoders): warm-up on a side
stream, capture, replay on static buffers; a key whose capture fails runs eagerly from then on, said once in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from .bounded_cache import BoundedCache

log = logging.getLogger("lcmla")
_said: set[str] = set()
WARMUP_RUNS = 2  # outside the graph: library handles, autotuning, lazy state


def say_once(message: str, level: int = logging.WARNING) -> None:
    """Log a notice the first time it comes up in this process."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


@dataclass
class Captured:
    """A CUDA graph of ``run(inputs)``: copy new values into ``inputs``, :meth:`replay`, read ``outputs``."""

    graph: torch.cuda.CUDAGraph
    inputs: Any  # the static tensors the graph reads
    outputs: Any  # the static tensors it writes (what ``run`` returned while captured)
    bytes: int = 0  # GPU memory its capture took (buffers, graph pool)

    def replay(self) -> None:
        self.graph.replay()


def capture(run: Callable[[Any], Any], inputs: Any) -> Captured:
    """``run(inputs)`` warmed up on a side stream, then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            run(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads may keep the GPU busy (eager work) while this one captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = run(inputs)
    return Captured(graph, inputs, outputs)


class GraphCache:
    """Captured graphs by key, least recently used first out beyond ``max_bytes`` of GPU memory; a key whose capture
    fails is run eagerly by the caller from then on. ``lock`` serialises the users of one cache: a graph's buffers
    are shared by every call of its key."""

    def __init__(self, what: str, max_bytes: float) -> None:
        self.what = what  # what is captured, for the log line of a failed capture
        self.lock = threading.Lock()
        self._graphs: BoundedCache[Captured] = BoundedCache(max_bytes, lambda captured: captured.bytes)
        self._eager: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def last(self) -> Captured | None:
        """The most recently used graph."""
        graphs = self._graphs.values()
        return graphs[-1] if graphs else None

    def clear(self) -> None:
        self._graphs.clear()
        self._eager.clear()

    def get(self, key: Hashable, make: Callable[[], Captured]) -> Captured | None:
        """The graph of ``key`` (``make`` captures it on first use); ``None``: run eagerly (its capture failed)."""
        if key in self._eager:
            return None

        def measured() -> Captured:
            before = torch.cuda.memory_reserved()
            captured = make()
            captured.bytes = max(0, torch.cuda.memory_reserved() - before)
            return captured

        try:
            return self._graphs.get(key, measured)
        except RuntimeError as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            say_once(f"CUDA graph capture failed for {self.what} ({error}); it runs eagerly")
            self._eager.add(key)
            return None
