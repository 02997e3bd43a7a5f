"""Host values onto the device without stalling the host: one way for every small per-call transfer.

A copy from pageable host memory to a GPU first waits for the work queued on the stream, so each one inside a
generation call would hold the host until the GPU caught up and leave the GPU idle while the host prepares the
next launch. Staged through pinned memory, the copy is queued like a kernel and the host goes on.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(value: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` on ``device`` (in ``dtype``); from the CPU to a GPU asynchronously, through pinned memory."""
    if device.type != "cuda" or value.device.type != "cpu":
        return value.to(device=device, dtype=dtype)
    if dtype is not None:
        value = value.to(dtype)
    return value.pin_memory().to(device, non_blocking=True)


def device_tensor(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` made on the host and sent to ``device`` by :func:`to_device`."""
    return to_device(torch.tensor(data, dtype=dtype), device)
