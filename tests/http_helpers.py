"""Helpers of the tests that speak HTTP to a local server: a free port, images as bytes, a client of the
``lcmla serve`` API, server-sent events."""

from __future__ import annotations

import io
import json
import socket
from typing import TYPE_CHECKING

import numpy as np
import requests
from PIL import Image

if TYPE_CHECKING:
    from lcmla_sdk.serve import ServeSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def assert_same_image(data: bytes, direct: Image.Image) -> None:
    difference = np.abs(pixels(data) - np.asarray(direct, dtype=np.int16)).max()
    assert difference <= 1, f"served image differs from the direct call by up to {difference}"


class Service:
    """A client of a running ``lcmla serve``."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings, self.url = settings, settings.url

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def identity(self, image: Image.Image, **form) -> str:
        response = self.post("/v1/identities", files=[("photos", ("face.png", png(image), "image/png"))], data=form)
        assert response.status_code in (200, 201), response.text
        return response.json()["id"]

    def generate(self, **body) -> dict:
        response = self.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()


def server_sent_events(response: requests.Response, on_event=None) -> list[tuple[str, dict]]:
    """The stream's events as (name, data); ``on_event(name, data)`` is called as each one arrives."""
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
            if on_event is not None:
                on_event(*events[-1])
    return events
