"""A cache bounded by memory: values by key, least recently used first out beyond a number of bytes.

Used for the captured sampling steps and text encoders (:mod:`lcmla_sdk.cuda_graphs`) and the per-identity K/V
(:mod:`lcmla_sdk.kv_cache`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class BoundedCache(Generic[Value]):
    """Values by key; beyond ``max_bytes`` in all (``size`` of each value), the least recently used go first, but
    the newest value always stays. Thread-safe; a missing value is made outside the lock (two threads may both make
    it: the last one made is kept)."""

    def __init__(self, max_bytes: float, size: Callable[[Value], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def values(self) -> list[Value]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key: Hashable, make: Callable[[], Value]) -> Value:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > 1 and sum(map(self._size, self._entries.values())) > self.max_bytes:
                self._entries.popitem(last=False)
        return value
