"""What the ingress and the model replicas pass each other: a generate request (:class:`Job`), a pass's progress
and its outcome. Apart from the model deployment, so the ingress imports neither the pipeline nor diffusers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .failures import Failure


@dataclass
class Job:
    """One HTTP generate request: ``generate``'s keyword arguments as sent, and the face (a store id or photos)."""

    arguments: dict[str, Any]
    identity: str | None = None
    photos: list[bytes] | None = None
    crop: str = "none"
    face_resize: str = "squash"
    affinity: str | None = None  # read by routing.IdentityAffinityRouter
    received: float = field(default_factory=time.time)
    deadline: float = float("inf")  # time.time() after which no one waits for the images
    progress: bool = False  # whether its client follows the pass's progress (server-sent events)
    # Set on the replica when ``progress``: called from the pass's thread with (steps done, steps) after each step.
    report: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)
    left: bool = field(default=False, compare=False)  # set on the replica when Ray cancels the request: its client left


@dataclass
class Outcome:
    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8; the ingress encodes them
    seeds: list[int] = field(default_factory=list)
    replica: str = ""
    kv_cache_hit: bool | None = None
    batch_requests: int = 0  # requests in the replica's pass (several of Ray's batches, merged)
    pass_images: int = 0  # images in the generate pass that made these
    queue_ms: float = 0.0
    generate_ms: float = 0.0
    failure: Failure | None = None


@dataclass(frozen=True)
class Progress:
    """A streamed request's pass has run ``done`` of its ``steps`` steps (0 of 0: admitted, waiting for a pass)."""

    done: int
    steps: int
