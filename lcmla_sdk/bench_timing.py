"""Timing primitives of ``lcmla bench`` and the benchmark scripts: wall clock with device syncs, a piece of work
alone in a CUDA graph, the memory of modules' weights."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, work: Callable[[], Any], iters: int) -> tuple[float, float, float]:
    """``(first call ms, median ms of the next iters, peak extra GiB over what was allocated before)``, with the
    garbage of earlier work collected and what lives then kept out of the collector's later passes (``gc.freeze``).
    Measured on an H100 (``benchmarks/gc_probe.py``): after the other ways had run, the default batch-1 call's median
    was 387 ms, after this 345 ms, as in a fresh process (343 ms); the collector's own pauses were under 0.3 ms a
    call: not its pauses but perhaps what it frees slowed the call (the two were not measured apart)."""
    gc.collect()
    gc.freeze()
    try:
        return _measure(device, work, iters)
    finally:
        gc.unfreeze()


def _measure(device: torch.device, work: Callable[[], Any], iters: int) -> tuple[float, float, float]:
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    work()
    sync(device)
    first = (time.perf_counter() - begin) * 1000
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        work()
        sync(device)
        times.append((time.perf_counter() - begin) * 1000)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
    return first, statistics.median(times), peak


def graph_ms(device: torch.device, work: Callable[[], Any], replays: int = 10) -> float:
    """Milliseconds of ``work`` captured alone in a CUDA graph (eager wall clock on a CPU)."""
    if device.type != "cuda":
        return measure(device, work, replays)[1]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return measure(device, graph.replay, replays)[1]


def gib(*modules: torch.nn.Module) -> float:
    """Bytes of the distinct parameter storages of ``modules``, in GiB."""
    seen = {}
    for module in modules:
        for param in module.parameters():
            seen[param.data_ptr()] = param.numel() * param.element_size()
    return sum(seen.values()) / 2**30

