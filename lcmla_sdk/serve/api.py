"""The HTTP API (FastAPI, OpenAPI at ``/docs``, versioned under ``/v1``) and the ingress deployment that serves it.

JSON fields carry ``generate``'s argument names; uploads are the multipart field ``photos``. Every client error is a
JSON body ``{"error": ..., "field": ...}``: 400 bad values (the SDK's messages), 404 unknown identity, 413 upload too
large, 415 not an image, 422 no face or several, 503 with ``Retry-After`` when the queue is full, 504 past the
request timeout. A request whose replica dies is sent once more (generation is deterministic by seed).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations as objects in the replica.
import asyncio
import base64
import binascii
import io
import json
import logging
import time
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..defaults import AUTHORS_FREEU, DEFAULT_GUIDANCE
from ..identity import Identity
from ..images import load_rgb, pixel_sha256
from .failures import Failure, failure
from .messages import Job, Outcome, Progress
from .settings import ServeSettings, store_path
from .store import IdentityStore, UnknownIdentity, identity_id

log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
MAX_ATTEMPTS = 2  # a request whose replica dies is sent once more
DIED = Failure(503, "request", "request: the model replica died twice; retry later")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
ACCEPTED = {f"image/{name}": name for name in FORMATS}
EVENT_STREAM = "text/event-stream"


class ApiError(Exception):
    def __init__(self, failure_: Failure, headers: dict[str, str] | None = None) -> None:
        super().__init__(failure_.message)
        self.failure, self.headers = failure_, headers


class GenerateBody(BaseModel):
    """``generate``'s arguments, plus the face: ``identity`` (a stored id) or ``photos`` (base64, this request only)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    identity: str | None = Field(None, description="An id from POST /v1/identities.")
    photos: list[str] | None = Field(None, description="Base64-encoded photos of one person, instead of an identity.")
    crop: str = Field("none", description="With photos: 'none' or 'face'.")
    face_resize: str = Field("squash", description="With photos: 'squash' or 'crop'.")
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    num_images: int = 1
    seed: int | list[int] | None = None
    mode: str = "quality"
    steps: int | None = None
    guidance: list[float] = list(DEFAULT_GUIDANCE)
    height: int | None = None
    width: int | None = None
    use_kv: bool | None = None
    adapter_scale: float = 1.0
    kv_cache: bool = False
    freeu: list[float] | None = list(AUTHORS_FREEU)
    vae: str = "full"
    format: Literal["png", "jpeg", "webp"] = "png"


FACE_FIELDS = ("identity", "photos", "crop", "face_resize", "format")
app = FastAPI(title="lcmla", description="LCM-Lookahead face personalization on SDXL.", version="1")


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.failure.body(), error.failure.status, headers=error.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    names = [str(part) for part in first["loc"] if part not in ("body", "query", "path")]
    name = names[0] if names else "request"
    return JSONResponse({"error": f"{name}: {first['msg']}", "field": name}, 400)


# Everything the ingress's methods use is defined above it: serve.ingress serializes the app when the class is made.
async def _awaited(response):
    return await response


def describe(id_: str, identity: Identity) -> dict[str, Any]:
    return {
        "id": id_, "references": identity.num_references, "sources": identity.sources, "crop": identity.crop,
        "face_resize": identity.face_resize, "face_backend": identity.face_backend or None,
        "faces": [{"box": box, "landmarks": marks} for box, marks in zip(identity.boxes, identity.landmarks or [None] * len(identity.boxes))],
    }  # fmt: skip


def _headers(outcome: Outcome, attempts: int, total_ms: float) -> dict[str, str]:
    """The JSON answer's fields beside a bare image; its timings as the standard ``Server-Timing`` header."""
    timings = {"queue": outcome.queue_ms, "generate": outcome.generate_ms, "total": total_ms}
    return {"X-Seed": str(outcome.seeds[0]), "X-Replica": outcome.replica, "X-Attempts": str(attempts),
            "X-KV-Cache-Hit": str(outcome.kv_cache_hit).lower(), "X-Batch-Requests": str(outcome.batch_requests),
            "X-Pass-Images": str(outcome.pass_images),
            "Server-Timing": ", ".join(f"{name};dur={ms:.1f}" for name, ms in timings.items())}  # fmt: skip


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"compress_level": 1} if image_format == "png" else {"quality": 95}
    Image.fromarray(pixels).save(buffer, format=FORMATS[image_format], **options)
    return buffer.getvalue()


def _response(outcome: Outcome, images: list[bytes], image_format: str, attempts: int, total_ms: float) -> dict[str, Any]:
    return {
        "images": [{"seed": seed, "format": image_format, "data": base64.b64encode(data).decode()}
                   for seed, data in zip(outcome.seeds, images)],
        "replica": outcome.replica, "kv_cache_hit": outcome.kv_cache_hit, "attempts": attempts,
        "batch": {"requests": outcome.batch_requests, "pass_images": outcome.pass_images},
        "timings": {"queue_ms": round(outcome.queue_ms, 1), "generate_ms": round(outcome.generate_ms, 1),
                    "total_ms": round(total_ms, 1)},
    }  # fmt: skip


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: dict[str, Any]) -> None:
        self.settings = ServeSettings.from_args(args)
        self.generator = generator
        self.streaming = generator.options(stream=True)  # the model's generate streams progress, then the answer
        self.store = IdentityStore(store_path(self.settings))
        self.fingerprint: str | None = None

    @app.get("/v1/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ready")
    async def ready(self) -> dict[str, Any]:
        """A model replica answers: its model is loaded and its ``warmup`` shapes captured."""
        info = await self._call(lambda: self.generator.ready.remote(), timeout=5.0, retry_after=True)
        self.fingerprint = info["fingerprint"]
        return {"ready": True, **info}

    # ------------------------------------------------------------------ identities
    @app.post("/v1/identities", status_code=201)
    async def create_identity(
        self, photos: list[UploadFile] = File(...), crop: str = Form("none"), face_resize: str = Form("squash")
    ) -> JSONResponse:
        """Encode one or more photos of one person into a stored identity; the same photos give the same id."""
        if len(photos) > self.settings.max_photos:
            raise ApiError(Failure(400, "photos", f"photos: {len(photos)} given, at most {self.settings.max_photos}"))
        data = [await self._read(photo) for photo in photos]
        sources = await asyncio.to_thread(self._pixel_hashes, data)
        fingerprint = await self._fingerprint()
        id_ = identity_id(fingerprint, sources, crop, face_resize)
        if self.store.exists(id_):
            return JSONResponse(describe(id_, await asyncio.to_thread(self._load, id_)), 200)
        made = await self._call(lambda: self.generator.encode.remote(data, crop, face_resize))
        if isinstance(made, Failure):
            raise ApiError(made)
        await asyncio.to_thread(self.store.save, made, id_)
        return JSONResponse(describe(id_, made), 201)

    @app.get("/v1/identities/{identity}")
    async def get_identity(self, identity: str) -> dict[str, Any]:
        await self._fingerprint()
        return describe(identity, await asyncio.to_thread(self._load, identity))

    @app.delete("/v1/identities/{identity}", status_code=204)
    async def delete_identity(self, identity: str) -> Response:
        """Delete the file; every replica drops the identity and its K/V before its next batch or health check."""
        if not self._guard(lambda: self.store.delete(identity)):
            raise ApiError(Failure(404, "identity", f"identity: no identity {identity}"))
        return Response(status_code=204)

    # ------------------------------------------------------------------ generation
    @app.post("/v1/generate")
    async def generate(self, body: GenerateBody, request: Request) -> Response:
        """Images of a stored identity (or of inline photos); JSON with base64 images, or with ``Accept: image/png``
        (jpeg, webp) the bare image of a one-image request, or with ``Accept: text/event-stream`` progress as
        server-sent events followed by the JSON answer."""
        accept = request.headers.get("accept", "").split(",")[0].strip()
        image_format = ACCEPTED.get(accept, body.format)
        job = Job(body.model_dump(exclude=set(FACE_FIELDS)), body.identity, None, body.crop, body.face_resize,
                  affinity=body.identity if body.kv_cache else None, progress=accept == EVENT_STREAM)  # fmt: skip
        if (body.identity is None) == (body.photos is None):
            raise ApiError(Failure(400, "identity", "identity: give either an identity id or photos"))
        if body.identity is not None and not self._guard(lambda: self.store.exists(body.identity)):
            raise ApiError(Failure(404, "identity", f"identity: no identity {body.identity}"))
        if body.photos is not None:
            if len(body.photos) > self.settings.max_photos:
                raise ApiError(Failure(400, "photos", f"photos: {len(body.photos)} given, at most {self.settings.max_photos}"))
            job.photos = [self._decode_base64(photo) for photo in body.photos]
            await asyncio.to_thread(self._pixel_hashes, job.photos)
        job.deadline = time.time() + self.settings.request_timeout_s
        if accept == EVENT_STREAM:
            return await self._stream(job, image_format)
        began = time.perf_counter()
        outcome, attempts = await self._call(lambda: self._outcome(job), count_attempts=True)
        if outcome.failure is not None:
            raise ApiError(outcome.failure)
        if accept in ACCEPTED and len(outcome.images) != 1:
            raise ApiError(Failure(406, "num_images", f"num_images: Accept {accept} takes one image, not {len(outcome.images)}"))
        images = await asyncio.to_thread(lambda: [encode_image(image, image_format) for image in outcome.images])
        total_ms = (time.perf_counter() - began) * 1000
        if accept in ACCEPTED:
            return Response(images[0], media_type=accept, headers=_headers(outcome, attempts, total_ms))
        return JSONResponse(_response(outcome, images, image_format, attempts, total_ms))

    async def _stream(self, job: Job, image_format: str) -> StreamingResponse:
        """Events ``progress`` ``{"done", "steps"}`` (0 of 0 once admitted, then after every step of the pass), then
        ``result`` (the JSON answer) or ``error`` (``{"error", "field", "status"}``). What is refused before the
        request is admitted (503 full queue, 404, 400) is a plain JSON answer, as without the stream."""
        began = time.perf_counter()

        async def admitted():
            stream = self.streaming.generate.remote(job)
            return stream, await stream.__anext__()  # Progress(0, 0), or the full queue's BackPressureError

        (stream, first), attempts = await self._call(admitted, count_attempts=True)

        async def events():
            nonlocal attempts
            yield _event("progress", asdict(first))
            try:
                outcome = None
                while outcome is None:
                    item = await asyncio.wait_for(stream.__anext__(), max(0.0, job.deadline - time.time()) + 1.0)
                    if isinstance(item, Progress):
                        yield _event("progress", asdict(item))
                    else:
                        outcome = item
            except asyncio.TimeoutError:
                outcome = Outcome(failure=Failure(504, "timeout", f"timeout: timed out after {self.settings.request_timeout_s:g} s"))
            except RayActorError:  # the replica died in the pass: once more elsewhere (if not already), without progress
                try:
                    if attempts == MAX_ATTEMPTS:
                        raise ApiError(DIED)
                    left = max(0.01, job.deadline - time.time())
                    outcome, again = await self._call(lambda: self._outcome(job), timeout=left, count_attempts=True,
                                                      attempts=MAX_ATTEMPTS - attempts)  # fmt: skip
                    attempts += again
                except ApiError as error:
                    outcome = Outcome(failure=error.failure)
            except Exception as error:  # a server error: the stream still ends with an event saying so
                log.exception("a streamed request failed")
                outcome = Outcome(failure=Failure(500, "request", f"server error: {type(error).__name__}: {error}"))
            finally:
                stream.cancel()  # the client may have gone: its replica stops streaming to no one
            if outcome.failure is not None:
                yield _event("error", {**outcome.failure.body(), "status": outcome.failure.status})
                return
            images = await asyncio.to_thread(lambda: [encode_image(image, image_format) for image in outcome.images])
            yield _event("result", _response(outcome, images, image_format, attempts, (time.perf_counter() - began) * 1000))

        return StreamingResponse(events(), media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache"})

    async def _outcome(self, job: Job) -> Outcome:
        """The replica's answer to ``job`` (the progress of a streamed job sent again after its replica died, skipped)."""
        stream = self.streaming.generate.remote(job)
        try:
            async for item in stream:
                if isinstance(item, Outcome):
                    return item
        finally:
            stream.cancel()  # after a timeout, say
        raise RuntimeError("the model replica's stream ended without an answer")

    # ------------------------------------------------------------------ helpers
    async def _call(self, send, timeout: float | None = None, retry_after: bool = False, count_attempts: bool = False,
                    attempts: int = MAX_ATTEMPTS):  # fmt: skip
        """Send to the model deployment: a dead replica's request once more (up to ``attempts`` in all); full queue
        -> 503; late -> 504."""
        deadline = time.monotonic() + (timeout or self.settings.request_timeout_s)
        for attempt in range(1, attempts + 1):
            try:
                result = await asyncio.wait_for(_awaited(send()), max(0.0, deadline - time.monotonic()))
                return (result, attempt) if count_attempts else result
            except BackPressureError:
                raise ApiError(Failure(503, "request", "request: the queue is full; retry later"),
                               {"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
            except asyncio.TimeoutError:
                headers = {"Retry-After": str(RETRY_AFTER_S)} if retry_after else None
                status, message = (503, "not ready") if retry_after else (504, f"timed out after {self.settings.request_timeout_s:g} s")
                raise ApiError(Failure(status, "timeout", f"timeout: {message}"), headers) from None
            except RayActorError:
                if attempt == attempts:
                    raise ApiError(DIED, {"Retry-After": str(RETRY_AFTER_S)}) from None

    async def _fingerprint(self) -> str:
        if self.fingerprint is None:
            await self.ready()
        return self.fingerprint

    async def _read(self, photo: UploadFile) -> bytes:
        data = await photo.read(self.settings.max_upload_bytes + 1)
        if len(data) > self.settings.max_upload_bytes:
            raise ApiError(Failure(413, "photos", f"photos: {photo.filename} is over the {self.settings.max_upload_mib:g} MiB limit"))
        return data

    def _decode_base64(self, text: str) -> bytes:
        if len(text) * 3 // 4 > self.settings.max_upload_bytes:
            raise ApiError(Failure(413, "photos", f"photos: a photo is over the {self.settings.max_upload_mib:g} MiB limit"))
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(Failure(400, "photos", "photos: not valid base64")) from None

    def _pixel_hashes(self, data: list[bytes]) -> list[str]:
        """Each photo decoded (415 when it is not an image) and hashed as ``Identity.sources`` hashes it."""
        return [pixel_sha256(self._guard(lambda d=d: load_rgb(d))) for d in data]

    def _load(self, identity: str) -> Identity:
        return self._guard(lambda: self.store.load(identity, self.fingerprint))

    @staticmethod
    def _guard(action):
        """``action()``, with the client's mistakes it raises as :class:`ApiError`."""
        try:
            return action()
        except (ValueError, UnknownIdentity) as error:
            raise ApiError(failure(error)) from None

