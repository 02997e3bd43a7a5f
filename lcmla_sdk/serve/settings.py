"""``ServeSettings``: everything an operator chooses for ``lcmla serve``, checked before Ray starts (errors name the
option), and the Ray Serve config file it becomes for ``serve deploy`` on a cluster."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import validation
from ..defaults import MODES

APP_NAME = "lcmla"
MAX_BATCH_SIZE = 256  # requests in one pass, at most
WARMUP = re.compile(r"^(quality|fast):(\d+):(\d+)x(\d+)$")  # MODE:IMAGES:HEIGHTxWIDTH


@dataclass(frozen=True)
class Shape:
    """One shape to capture before the service reports ready: ``mode``, images per pass, size."""

    mode: str
    images: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        found = WARMUP.match(text) if isinstance(text, str) else None
        if found is None:
            raise ValueError(f"warmup: {text!r} is not MODE:IMAGES:HEIGHTxWIDTH (e.g. fast:8:1024x1024)")
        mode, images, height, width = found.groups()
        return cls(mode, validation.integer(int(images), "warmup", 1), int(height), int(width))

    def __str__(self) -> str:
        return f"{self.mode}:{self.images}:{self.height}x{self.width}"


@dataclass(frozen=True)
class Placement:
    """How many model replicas run and what each holds. ``cpus`` also sets the replica's torch threads (Ray sets
    ``OMP_NUM_THREADS`` to an actor's CPUs, and to 1 when it names none)."""

    replicas: int
    gpus: float
    cpus: float


@dataclass(frozen=True)
class ServeSettings:
    """``model``: a model directory or preset. ``replicas``: model replicas (default: one per GPU, else one);
    ``gpus_per_replica``: GPUs each holds (default: 1 with GPUs, else 0); ``cpus_per_replica``: CPUs each holds
    (default: on one machine its CPUs but one, shared by the replicas; on a cluster 1). ``store``: the identity folder (on a cluster,
    a folder every node reads and writes). ``max_batch_size`` requests merged into one pass after at most
    ``batch_wait_s``; ``max_queued_requests`` waiting beyond what the replicas hold, then 503. ``kv_cache_gib``: each
    replica's K/V-cache bound (least recently used out). ``warmup``: shapes captured before ready."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None
    store: str = "lcmla-identities"
    max_batch_size: int = 8
    batch_wait_s: float = 0.02
    max_queued_requests: int = 64
    request_timeout_s: float = 300.0
    kv_cache_gib: float = 16.0
    max_upload_mib: float = 10.0
    max_photos: int = 8
    warmup: tuple[Shape, ...] = field(default_factory=tuple)
    device: str | None = None
    faces: str = "auto"

    def __post_init__(self) -> None:
        for name in ("model", "host", "store", "faces"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        validation.integer(self.port, "port", 0, 65535)
        if self.replicas is not None:
            validation.integer(self.replicas, "replicas", 1)
        if self.gpus_per_replica is not None:
            validation.number(self.gpus_per_replica, "gpus_per_replica", 0.0, 64.0)
        if self.cpus_per_replica is not None:
            validation.number(self.cpus_per_replica, "cpus_per_replica", 0.0, 4096.0)
        validation.integer(self.max_batch_size, "max_batch_size", 1, MAX_BATCH_SIZE)
        validation.number(self.batch_wait_s, "batch_wait_s", 0.0, 10.0)
        validation.integer(self.max_queued_requests, "max_queued_requests", 1)
        validation.number(self.request_timeout_s, "request_timeout_s", 0.1, 86400.0)
        validation.number(self.kv_cache_gib, "kv_cache_gib", 0.0, 4096.0)
        validation.number(self.max_upload_mib, "max_upload_mib", 0.001, 1024.0)
        validation.integer(self.max_photos, "max_photos", 1, 64)
        object.__setattr__(self, "warmup", tuple(w if isinstance(w, Shape) else Shape.parse(w) for w in self.warmup))
        for shape in self.warmup:
            validation.steps(None, shape.mode, MODES[shape.mode])
        validation.device(self.device)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mib * 2**20)

    def placement(self, gpus: int, cpus: int | None = None) -> Placement:
        """The replicas where ``gpus`` GPUs and, on one machine, ``cpus`` CPUs (``None``: a cluster's) are to be had:
        by default one replica per GPU; one CPU stays for the HTTP proxy and the ingress."""
        per_replica = self.gpus_per_replica if self.gpus_per_replica is not None else (1.0 if gpus else 0.0)
        if self.replicas is not None:
            replicas = self.replicas
        else:
            replicas = max(1, int(gpus // per_replica)) if per_replica else 1
        if self.cpus_per_replica is not None:
            share = self.cpus_per_replica
        else:
            share = 1.0 if cpus is None else float(max(1, (cpus - 1) // replicas))
        return Placement(replicas, per_replica, share)

    def to_args(self) -> dict[str, Any]:
        """Plain values for a Ray Serve application builder (:func:`from_args` reads them back)."""
        args = asdict(self)
        args["warmup"] = [str(shape) for shape in self.warmup]
        return args

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a setting of lcmla serve")
        values = dict(args)
        values["warmup"] = tuple(values.get("warmup") or ())
        return cls(**values)

    def config(self) -> dict[str, Any]:
        """A Ray Serve config (``serve deploy FILE``) of this service; replicas and GPUs are placed on the cluster
        by :func:`lcmla_sdk.serve.launch.app_builder` from these settings and the cluster's GPUs."""
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.host, "port": self.port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "lcmla_sdk.serve.launch:app_builder",
                              "args": self.to_args()}],
        }  # fmt: skip


def store_path(settings: ServeSettings) -> Path:
    return Path(settings.store).expanduser().resolve()
