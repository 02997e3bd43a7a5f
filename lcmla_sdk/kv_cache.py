"""The per-identity K/V cache: the K/V-encoder's output for a schedule's timesteps, computed once per identity with
the identity's fixed reference noise, kept least recently used first out beyond a memory bound.

A documented deviation from the authors, who noise the reference with each image's own initial noise (README).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from .sampling import flatten_kv, join_references
from .schedule import StepTable, noise_reference

KV_CACHE_BYTES = 16 * 2**30  # per Personalizer
Entry = tuple[torch.Tensor, tuple[tuple[int, int], ...]]  # (steps, G, elements) flat K/V per step, and its layout


class IdentityKVCache:
    """Entries keyed by tuples whose first item is the identity's :meth:`~lcmla_sdk.Identity.digest`; ``computed``
    and ``evicted`` count the entries computed (misses) and pushed out by the bound since the cache was made."""

    def __init__(self, max_bytes: int = KV_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.computed = 0
        self.evicted = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def discard(self, digest: str) -> int:
        """Drop every entry of the identity with this digest; return how many there were."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == digest]
            for key in keys:
                del self._entries[key]
        return len(keys)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, key: tuple, compute: Callable[[], Entry]) -> Entry:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        entry = compute()
        with self._lock:
            self.computed += 1
            self._entries[key] = entry
            while len(self._entries) > 1 and sum(_bytes(e) for e in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
                self.evicted += 1
        return entry


def _bytes(entry: Entry) -> int:
    return entry[0].numel() * entry[0].element_size()


def compute_kv(
    encoder, table: StepTable, face: torch.Tensor, face_noise: torch.Tensor, text: torch.Tensor,
    pooled: torch.Tensor, time_ids: torch.Tensor, groups: int, max_bytes: int,
) -> Entry:  # fmt: skip
    """The encoder's joined K/V at every step of ``table`` (rows: ``groups`` x references), refused up front with the
    size it would need when one identity's K/V exceed ``max_bytes``."""
    steps = []
    for index in range(table.steps):
        timestep = table.timesteps[index : index + 1].expand(face.shape[0])
        kv = encoder(noise_reference(table.coefficients[index], face, face_noise), timestep, text, pooled, time_ids)
        flat, layout = flatten_kv(join_references(kv, groups))
        need = flat.numel() * flat.element_size() * table.steps
        if need > max_bytes:
            raise ValueError(f"kv_cache: this identity's K/V for {table.steps} steps need {need / 2**30:.1f} GiB, over "
                             f"the cache's {max_bytes / 2**30:.0f} GiB; use fewer steps or kv_cache=False")  # fmt: skip
        steps.append(flat)
    return torch.stack(steps), layout
