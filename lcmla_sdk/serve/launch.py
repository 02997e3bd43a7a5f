"""Starting and stopping the service: Ray on this machine (no dashboard, usage stats off), the application, a clean
shutdown; and the application builder that ``serve deploy`` of a written config calls on a cluster."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

from .settings import APP_NAME, Placement, ServeSettings

# Ray reads this when it starts; nothing of this service is reported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from .api import Ingress  # noqa: E402
from .model import Generator  # noqa: E402
from .routing import IdentityAffinityRouter  # noqa: E402

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding lcmla_sdk, for Ray's worker processes


def build(settings: ServeSettings, placement: Placement) -> serve.Application:
    """The application: the ingress and the model replicas (routed by :class:`IdentityAffinityRouter`)."""
    replicas = placement.replicas
    # A replica holds one batch running and the next one filling; the queue beyond that is bounded.
    ongoing = 2 * settings.max_batch_size
    generator = Generator.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": placement.gpus, "num_cpus": placement.cpus},
        max_ongoing_requests=ongoing,
        max_queued_requests=settings.max_queued_requests,
        request_router_config=RequestRouterConfig(request_router_class=IdentityAffinityRouter),
    ).bind(settings.to_args())  # fmt: skip
    # The ingress only awaits: it takes everything the model replicas and their queue can hold, so the 503 comes
    # from the model's queue bound and not from the HTTP proxy.
    ingress = Ingress.options(max_ongoing_requests=replicas * ongoing + settings.max_queued_requests + 16)
    return ingress.bind(generator, settings.to_args())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve deploy`` of the config ``lcmla serve --write-config`` writes (runs on the cluster)."""
    settings = ServeSettings.from_args(args)
    return build(settings, settings.placement(int(ray.cluster_resources().get("GPU", 0))))


def local_gpus(settings: ServeSettings) -> int:
    if settings.device is not None and not settings.device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def start(settings: ServeSettings) -> str:
    """Start Ray on this machine and deploy; return the service's URL once every replica is up."""
    gpus, cpus = local_gpus(settings), os.cpu_count() or 1
    placement = settings.placement(gpus, cpus)
    path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local", include_dashboard=False, num_gpus=gpus,
        num_cpus=max(cpus, math.ceil(placement.replicas * placement.cpus) + 1),
        runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level=logging.WARNING,
    )  # fmt: skip
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, placement), name=APP_NAME, route_prefix="/")
    except BaseException:
        stop()
        raise
    return settings.url


def stop() -> None:
    """Shut the service and Ray down (their processes end); nothing to do when Ray is not running (calling
    ``serve.shutdown`` then would start it)."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_until_signal(settings: ServeSettings, say=print) -> None:
    """``start``, say the URL, serve until Ctrl-C or SIGTERM, ``stop``."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = start(settings)
        say(f"serving {url} (API docs: {url}/docs); identities in {Path(settings.store).expanduser().resolve()}; "
            "Ctrl-C stops")  # fmt: skip
        while not stopping.wait(1.0):
            pass
    finally:
        say("stopping")
        stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
