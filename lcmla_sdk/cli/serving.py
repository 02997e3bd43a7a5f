"""Serving: ``lcmla serve`` (HTTP, Ray Serve) and ``lcmla demo`` (the web app).

Ray Serve and FastAPI (the [serve] extra), and Gradio (the [demo] extra), are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import FACES_HELP, USER_ERRORS, console, fail


def serve_command(
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(8000),
    replicas: Optional[int] = typer.Option(None, help="Model replicas (default: one per GPU, else one)."),
    gpus_per_replica: Optional[float] = typer.Option(None, help="GPUs each replica holds (default: 1, or 0 without GPUs)."),
    cpus_per_replica: Optional[float] = typer.Option(
        None, help="CPUs each replica holds, its torch threads (default: this machine's CPUs but one, shared)."
    ),
    store: str = typer.Option("lcmla-identities", help="Identity store folder (on a cluster: one every node can read)."),
    max_batch_size: int = typer.Option(8, help="Requests merged into one pass at most."),
    batch_wait_ms: float = typer.Option(20.0, help="How long a batch waits to fill."),
    max_queued: int = typer.Option(64, help="Requests waiting beyond what the replicas hold; then 503."),
    timeout: float = typer.Option(300.0, help="Request timeout in seconds (then 504)."),
    kv_cache_gib: float = typer.Option(16.0, help="Each replica's per-identity K/V cache bound (LRU out)."),
    max_upload_mib: float = typer.Option(10.0, help="Largest photo accepted (then 413)."),
    warmup: Optional[list[str]] = typer.Option(None, help="Shape to capture before ready, MODE:IMAGES:HxW; repeat."),
    faces: str = typer.Option("auto", help=FACES_HELP),
    device: Optional[str] = typer.Option(None, help="Device of the replicas (default: cuda if available, else cpu)."),
    write_config: Optional[Path] = typer.Option(None, help="Write a Ray Serve config for `serve deploy` and exit."),
) -> None:
    """Serve the model over HTTP (Ray Serve, on this machine) until Ctrl-C; docs/SERVING.md."""
    try:
        from ..serve.settings import ServeSettings
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise fail(ValueError(f"serving needs the [serve] extra (pip install 'lcmla[serve]'): {error}")) from None
    try:
        settings = ServeSettings(
            model=model, host=host, port=port, replicas=replicas, gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica, store=str(Path(store).expanduser().resolve()),
            max_batch_size=max_batch_size, batch_wait_s=batch_wait_ms / 1000, max_queued_requests=max_queued,
            request_timeout_s=timeout, kv_cache_gib=kv_cache_gib, max_upload_mib=max_upload_mib,
            warmup=tuple(warmup or ()), faces=faces, device=device,
        )  # fmt: skip
        if write_config is not None:
            import yaml

            from ..atomic import write_text

            typer.echo(str(write_text(write_config, yaml.safe_dump(settings.config(), sort_keys=False))))
            return
        from ..serve.launch import serve_until_signal

        serve_until_signal(settings, say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except USER_ERRORS as error:
        raise fail(error) from None


def demo(
    model: str = typer.Option("tiny", help="Model directory, or an embedded preset name ('tiny', 'sdxl')."),
    server: Optional[str] = typer.Option(None, help="URL of an `lcmla serve` service to use instead of a model."),
    host: str = typer.Option("127.0.0.1", help="Address to serve the page on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port of the page."),
    faces: str = typer.Option("auto", help=FACES_HELP),
    device: Optional[str] = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
) -> None:
    """Open the web app (Gradio; the `demo` extra): photos in, a gallery out."""
    from .. import validation

    try:
        validation.device(device)
        validation.integer(port, "port", 1, 65535)
        if server is not None and not server.startswith(("http://", "https://")):
            raise ValueError(f"server: expected an http:// or https:// URL, got {server!r}")
        try:
            from ..demo.app import launch
        except ImportError as error:
            raise ValueError(f"demo: needs Gradio ({error}); install it with: pip install 'lcmla[demo]'") from None
        console.print(f"lcmla demo on http://{host}:{port} (Ctrl-C stops it)", highlight=False)
        launch(model, server, host, port, device, faces, open_browser)
    except USER_ERRORS as error:
        raise fail(error) from None
