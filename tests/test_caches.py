"""The one bounded cache (``bounded_cache``) and the one CUDA-graph cache (``cuda_graphs``) every cached part uses
(issue 18): least recently used first out beyond a number of bytes; a key whose capture fails runs eagerly, said
once in the log."""

import logging

import pytest
import torch

from lcmla_sdk.bounded_cache import BoundedCache
from lcmla_sdk.cuda_graphs import Captured, GraphCache
from lcmla_sdk.kv_cache import IdentityKVCache


def test_least_recently_used_go_first_beyond_the_bound_but_the_newest_stays():
    cache = BoundedCache(max_bytes=10, size=len)
    made = []
    value = lambda text: lambda: made.append(text) or text  # noqa: E731
    cache.get("a", value("aaaa"))
    cache.get("b", value("bbbb"))
    assert cache.get("a", value("never")) == "aaaa"  # a hit: not made again, and now the most recent
    cache.get("c", value("cccc"))  # 12 bytes: "b", the least recently used, goes
    assert "b" not in cache and "a" in cache and "c" in cache and made == ["aaaa", "bbbb", "cccc"]
    cache.get("d", value("d" * 50))  # over the bound alone: kept, everything else goes
    assert cache.values() == ["d" * 50]
    cache.clear()
    assert len(cache) == 0


def test_the_identity_kv_cache_counts_the_bytes_of_its_tensors():
    cache = IdentityKVCache(max_bytes=3 * 4 * 4)
    entry = lambda: (torch.zeros(4, 4), ((1, 4),))  # noqa: E731  64 bytes each in float32
    cache.get(1, entry)
    cache.get(2, entry)
    assert len(cache) == 1 and 2 in cache


def test_a_failed_capture_runs_eagerly_from_then_on_and_is_said_once(caplog):
    graphs = GraphCache("a test step", max_bytes=2**30)
    attempts = []

    def fail() -> Captured:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="lcmla"):
        assert graphs.get("key", fail) is None
        assert graphs.get("key", fail) is None  # not tried again
    assert attempts == [1] and "key" not in graphs
    assert [r.message for r in caplog.records].count(
        "CUDA graph capture failed for a test step (operation not permitted when stream is capturing); it runs eagerly"
    ) == 1


def test_running_out_of_memory_while_capturing_is_not_taken_for_an_uncapturable_step():
    graphs = GraphCache("a test step", max_bytes=2**30)

    def out_of_memory() -> Captured:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        graphs.get("key", out_of_memory)
