"""What the web app generates with: a model in this process, or an ``lcmla serve`` service over HTTP.

Both give the app the same three calls (encode photos into an identity, generate, load a saved identity), so the page
has no ``if remote``. Errors of the user's making come out as :class:`~lcmla_sdk.errors.LcmlaError` /
``ValueError`` with the service's or the SDK's message.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InvalidImageError, LcmlaError
from ..identity import Identity
from ..images import load_rgb
from ..pipeline import Personalizer
from ..request import MODES

Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass
class Person:
    """An identity the app holds: ``ref`` is an :class:`Identity` (local) or the service's id (remote); ``boxes``
    are the detected faces (x0, y0, x1, y1), one per photo (``None`` where detection is off)."""

    ref: Identity | str
    boxes: list[list[float] | None] = field(default_factory=list)
    label: str = ""


@dataclass
class Settings:
    """One generation's arguments, in ``generate``'s names."""

    prompts: list[str]
    negative_prompt: str | None
    mode: str
    steps: int | None
    seed: int
    num_images: int
    height: int | None
    width: int | None


class ServiceError(LcmlaError, ValueError):
    """The service refused a request (its JSON ``error`` message), or could not be reached."""


class LocalBackend:
    """A :class:`Personalizer` in this process."""

    def __init__(self, personalizer: Personalizer, name: str = "a model") -> None:
        self.personalizer = personalizer
        self.default_size = personalizer.default_size
        noise = " (random weights: it makes noise, not faces)" if name == "tiny" else ""
        self.where = f"{name}{noise}, in this process"

    def encode(self, photos: list[bytes]) -> Person:
        identity = self.personalizer.encode_face(photos)
        return Person(identity, identity.boxes, identity.digest()[:12])

    def load(self, path: str | Path) -> Person:
        identity = self.personalizer.load_identity(path)
        return Person(identity, identity.boxes, identity.digest()[:12])

    def generate(self, person: Person, settings: Settings, progress: Progress) -> list[tuple[Image.Image, int]]:
        total = settings.steps if isinstance(settings.steps, int) else MODES.get(settings.mode, 0)
        images = self.personalizer.generate(
            person.ref, settings.prompts, negative_prompt=settings.negative_prompt, num_images=settings.num_images,
            seed=settings.seed, mode=settings.mode, steps=settings.steps, height=settings.height,
            width=settings.width, callback=lambda index, timestep, latents: progress(index + 1, total),
        )  # fmt: skip
        return [(image, settings.seed + i) for i, image in enumerate(images)]


class RemoteBackend:
    """An ``lcmla serve`` service: ``POST /v1/identities`` (multipart ``photos``) and ``POST /v1/generate`` (JSON
    in ``generate``'s names plus ``identity``; images come back base64 with their seeds). A saved identity is the
    service's id, so "save" keeps the id and "load" reads it from a small text file."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        import httpx

        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)
        self.default_size = None  # the service's
        self.where = f"the lcmla service at {url}"

    def encode(self, photos: list[bytes]) -> Person:
        files = [("photos", (f"photo{i}", data, "application/octet-stream")) for i, data in enumerate(photos)]
        body = self._post("/v1/identities", files=files)
        return Person(body["id"], [face.get("box") for face in body.get("faces", [])], body["id"][:12])

    def load(self, path: str | Path) -> Person:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
        if not text or len(text) > 200 or not text.isprintable():
            raise ServiceError(f"identity: {Path(path).name} does not hold an identity id of {self.where}")
        body = self._call("GET", f"/v1/identities/{text}")
        return Person(body["id"], [face.get("box") for face in body.get("faces", [])], body["id"][:12])

    def generate(self, person: Person, settings: Settings, progress: Progress) -> list[tuple[Image.Image, int]]:
        payload: dict[str, Any] = {
            "identity": person.ref, "prompt": settings.prompts, "negative_prompt": settings.negative_prompt,
            "num_images": settings.num_images, "seed": settings.seed, "mode": settings.mode, "steps": settings.steps,
            "height": settings.height, "width": settings.width,
        }  # fmt: skip
        body = self._stream("/v1/generate", progress, json={k: v for k, v in payload.items() if v is not None})
        return [(Image.open(io.BytesIO(base64.b64decode(item["data"]))).convert("RGB"), item["seed"])
                for item in body["images"]]  # fmt: skip

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call("POST", path, **kwargs)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServiceError(f"server: {self.where} did not answer ({error})") from None
        return self._checked(response, method, path)

    def _stream(self, path: str, progress: Progress, **kwargs: Any) -> dict[str, Any]:
        """POST asking for progress as server-sent events: ``progress`` events go to ``progress``, the ``result``
        event is the answer; an ``error`` event or an error status raises :class:`ServiceError` with its message."""
        import httpx

        try:
            with self.client.stream("POST", path, headers={"Accept": "text/event-stream"}, **kwargs) as response:
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    response.read()
                    return self._checked(response, "POST", path)  # refused before the stream, or no stream offered
                name = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: "):
                        data = json.loads(line[len("data: ") :])
                        if name == "result":
                            return data
                        if name == "error":
                            raise ServiceError(data.get("error") or f"server: POST {path} failed ({data})")
                        if name == "progress" and data.get("steps"):
                            progress(data["done"], data["steps"])
        except httpx.HTTPError as error:
            raise ServiceError(f"server: {self.where} did not answer ({error})") from None
        raise ServiceError(f"server: {self.where} ended the stream of POST {path} without an answer")

    @staticmethod
    def _checked(response: Any, method: str, path: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else None
            raise ServiceError(message or f"server: {method} {path} answered {response.status_code}")
        return body


def saved_identity(backend: LocalBackend | RemoteBackend, person: Person, folder: Path) -> Path:
    """A file the user downloads to reuse ``person`` later: the identity (local) or its id (remote)."""
    if isinstance(person.ref, Identity):
        return person.ref.save(folder / f"identity-{person.label}.safetensors")
    path = folder / f"identity-{person.label}.txt"
    path.write_text(person.ref + "\n", encoding="utf-8")
    return path


def photo_bytes(path: str | Path, name: str) -> bytes:
    """An uploaded file's bytes, checked to be an image (``InvalidImageError`` naming the file otherwise)."""
    data = Path(path).read_bytes()
    try:
        load_rgb(data)
    except InvalidImageError:
        raise InvalidImageError(f"photos: {name} is not an image this app can read (JPEG, PNG, WebP, ...)") from None
    return data
