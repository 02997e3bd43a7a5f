"""The model deployment: one ``Personalizer`` per replica; ``@serve.batch`` gathers requests into batches, and each
pass (:mod:`.turns`: one at a time) merges the compatible requests of every batch waiting into one ``generate`` call.

Requests are compatible when every argument that shapes the pass is equal (mode, steps, size, guidance, K/V
options, adapter scale, VAE, FreeU, the identity's number of reference photos); their rows (identity, prompt,
negative prompt, seed) are stacked, each row with its own identity (``generate`` takes one per prompt). Each image has its
own generator, so an image does not depend on the pass it was made in. Images go back as arrays: the ingress encodes
them, so this process keeps the GPU busy. The replica's K/V cache is the
``Personalizer``'s, bounded by ``kv_cache_gib`` (least recently used out); an identity whose store file is deleted
or replaced loses its K/V here before the next pass and at every health check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from ray.serve.metrics import Counter, Histogram

from ..identity import Identity
from ..pipeline import Personalizer
from ..request import Request
from .failures import Failure, failure
from .messages import Job, Outcome, Progress
from .settings import MAX_BATCH_SIZE, ServeSettings, store_path
from .store import IdentityStore
from .turns import PassTurns

log = logging.getLogger("ray.serve")

RESIDENT_IDENTITIES = 256  # identities kept loaded per replica (their K/V are bounded by kv_cache_gib)
# What makes two requests' rows share a pass: the Request fields besides prompts, negatives, seeds and output.
PASS_FIELDS = ("mode", "steps", "guidance", "height", "width", "use_kv", "adapter_scale", "kv_cache", "face_noise",
               "vae", "freeu")  # fmt: skip


class PastDeadline(Exception):
    """Every request of a pass is past its deadline: the pass stops at its next step."""


@dataclass
class Prepared:
    job: Job
    identity: Identity
    request: Any  # lcmla_sdk.request.Request
    key: tuple


class UnreadEndsOfCancelledRequests(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for a ``StopAsyncIteration``: Ray's batching sets it on
    the next item of a request that was cancelled (its client left, or the ingress's timeout), which no one reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, StopAsyncIteration) and record.getMessage().startswith("Future exception was never retrieved"))


@serve.deployment(name="Generator", health_check_period_s=5.0)
class Generator:
    def __init__(self, args: dict[str, Any]) -> None:
        logging.getLogger("asyncio").addFilter(UnreadEndsOfCancelledRequests())  # one replica per process
        settings = ServeSettings.from_args(args)
        self.model = Personalizer.from_pretrained(settings.model, device=settings.device, faces=settings.faces)
        self.kv_cache = self.model.identity_kv_cache
        self.kv_cache.max_bytes = int(settings.kv_cache_gib * 2**30)
        self.store = IdentityStore(store_path(settings))
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.resident: OrderedDict[str, tuple[Identity, tuple[int, int]]] = OrderedDict()  # id -> (identity, file stamp)
        self.resident_lock = threading.Lock()  # batches run on a thread, health checks on the event loop
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_s)
        self.turns = PassTurns(self._run_batch, settings.max_batch_size, skip=self._unwanted)
        for shape in settings.warmup:
            self.model.warmup(shape.mode, shape.images, shape.height, shape.width)
        self.warmed = [str(shape) for shape in settings.warmup]
        self.kv_hits = Counter("lcmla_kv_cache_hits", "Identities whose K/V came from the cache (per pass).")
        self.kv_misses = Counter("lcmla_kv_cache_misses", "Identities whose K/V a pass computed.")
        self.kv_evictions = Counter("lcmla_kv_cache_evictions", "Identity K/V dropped by the cache's bound.")
        self.pass_images = Histogram("lcmla_pass_images", "Images per generate pass.", [1, 2, 4, 8, 16, 32, 64])
        self.dropped = Counter("lcmla_requests_dropped", "Requests dropped before their pass: their client left "
                               "(reason=left) or their deadline passed (reason=timeout).", tag_keys=("reason",))  # fmt: skip

    def ready(self) -> dict[str, Any]:
        return {"replica": self.replica, "fingerprint": self.model.fingerprint, "warmed": self.warmed}

    def check_health(self) -> None:
        self._drop_changed()

    async def encode(self, photos: list[bytes], crop: str, face_resize: str) -> Identity | Failure:
        try:
            return await asyncio.to_thread(self.model.encode_face, photos, crop=crop, face_resize=face_resize)
        except ValueError as error:
            return failure(error)

    async def generate(self, job: Job) -> AsyncIterator[Progress | Outcome]:
        """One request's images, streamed (``handle.options(stream=True)``): for a job that asks for ``progress``,
        ``Progress(0, 0)`` once a batch has taken it and a :class:`Progress` after every step of its pass; then its
        :class:`Outcome`."""
        try:
            async for item in self._batched(job):  # a handle streams only from a method that is itself a generator
                if item is not None:
                    yield item
        except asyncio.CancelledError:  # Ray cancels a request whose client left, but not the batch it came in
            job.left = True
            raise

    # Every batch Ray forms goes on at once (there are never more than the replica's ongoing requests): the passes
    # take turns in self.turns, which merges the batches waiting. Ray warns at start that max_batch_size times
    # max_concurrent_batches exceeds max_ongoing_requests; the latter is the bound that holds.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=2 * MAX_BATCH_SIZE)
    async def _batched(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        # Ray's batched streams take one item per request at each yield: None, nothing new for it; StopIteration, it
        # has ended. Each request ends with its own pass: a batch the turns split does not wait for its last pass.
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        for index, job in enumerate(jobs):
            if job.progress:  # no one reads the others' progress: it does not travel
                job.report = lambda done, steps, index=index: loop.call_soon_threadsafe(
                    updates.put_nowait, (index, Progress(done, steps)))  # fmt: skip
        pending = {asyncio.ensure_future(self.turns.submit([job])): index for index, job in enumerate(jobs)}
        ended: set[int] = set()

        def row(items: dict[int, Any]) -> list[Any]:
            return [StopIteration if i in ended else items.get(i) for i in range(len(jobs))]

        yield [Progress(0, 0) if job.progress else None for job in jobs]
        while pending:
            update = asyncio.ensure_future(updates.get())
            done, _ = await asyncio.wait({update, *pending}, return_when=asyncio.FIRST_COMPLETED)
            if update.done():
                yield row(dict([update.result()]))
            else:
                update.cancel()  # an item it was woken for stays in the queue
            finished = [task for task in done if task in pending]
            if finished:
                while not updates.empty():  # the last steps' reports were queued before the pass's end was
                    yield row(dict([updates.get_nowait()]))
                outcomes = {pending.pop(task): self._outcome_of(task) for task in finished}
                yield row(outcomes)
                ended.update(outcomes)
                yield row({})  # their streams end now, not at the batch's next item (nor unread at its end)

    def _outcome_of(self, task: asyncio.Task) -> Outcome:
        try:
            return task.result()[0]
        except Exception as error:  # a server error in the pass: a JSON 500 for its requests, not a broken stream
            log.exception("a pass failed")
            return Outcome(replica=self.replica, failure=Failure(500, "request", f"server error: {type(error).__name__}: {error}"))

    def _unwanted(self, job: Job) -> Outcome | None:
        """The outcome, without a pass, of a job no one waits for any more: its client left, or its deadline passed
        while it waited (its client has been answered 504 already)."""
        if time.time() > job.deadline:  # first: the ingress's timeout cancels the request too, making it "left"
            self.dropped.inc(tags={"reason": "timeout"})
            return Outcome(replica=self.replica, failure=Failure(504, "timeout", "timeout: waited past the request's deadline"))
        if job.left:
            self.dropped.inc(tags={"reason": "left"})
            return Outcome(replica=self.replica, failure=Failure(499, "request", "cancelled: the client left"))
        return None

    # ------------------------------------------------------------------ one pass
    def _run_batch(self, jobs: list[Job]) -> list[Outcome]:
        self._drop_changed()
        started = time.time()
        outcomes: dict[int, Outcome] = {}
        groups: dict[tuple, list[tuple[int, Prepared]]] = {}
        for index, job in enumerate(jobs):
            try:
                prepared = self._prepare(job)
            except (ValueError, LookupError) as error:
                outcomes[index] = Outcome(replica=self.replica, failure=failure(error))
                continue
            groups.setdefault(prepared.key, []).append((index, prepared))
        for members in groups.values():
            for index, outcome in self._run_group(members):
                outcome.batch_requests = len(jobs)
                outcome.queue_ms = max(0.0, started - jobs[index].received) * 1000  # two hosts' clocks, on a cluster
                outcomes[index] = outcome
        return [outcomes[index] for index in range(len(jobs))]

    def _prepare(self, job: Job) -> Prepared:
        request = Request.from_call(self.model, **{**job.arguments, "output": "np"})
        identity = self._identity(job)
        key = (identity.num_references, request.negative_prompt is None, *(getattr(request, name) for name in PASS_FIELDS))
        if request.kv_cache:  # the cached unconditional K/V hold one negative prompt
            key += (request.negative_prompt[0] if request.negative_prompt else None,)
        return Prepared(job, identity, request, key)

    def _run_group(self, members: list[tuple[int, Prepared]]) -> list[tuple[int, Outcome]]:
        try:
            return self._generate_together(members)
        except PastDeadline as error:
            late = Failure(504, "timeout", f"timeout: {error}")
            return [(index, Outcome(replica=self.replica, failure=late)) for index, _ in members]
        except ValueError as error:
            if len(members) == 1:  # the pass of one request: its own mistake
                return [(members[0][0], Outcome(replica=self.replica, failure=failure(error)))]
        # A merged pass refused (e.g. its memory estimate): each request alone, so an error stays with its request.
        return [result for member in members for result in self._run_group([member])]

    def _generate_together(self, members: list[tuple[int, Prepared]]) -> list[tuple[int, Outcome]]:
        rows = [(prepared.identity, *row) for _, prepared in members for row in _rows(prepared.request)]
        request = members[0][1].request
        made, evicted = self.kv_cache.made, self.kv_cache.evicted
        deadline = max(prepared.job.deadline for _, prepared in members)

        def after_step(index: int, _timestep: int, latents: Any) -> None:
            if latents.is_cuda:  # the host runs steps ahead of the GPU: report (and check the deadline) once done
                torch.cuda.current_stream(latents.device).synchronize()
            if time.time() > deadline:
                raise PastDeadline("stopped: the client's request timed out")
            for _, prepared in members:
                if prepared.job.report is not None:
                    prepared.job.report(index + 1, request.steps)

        begin = time.perf_counter()
        images = self.model.generate(
            [r[0] for r in rows], [r[1] for r in rows], negative_prompt=None if request.negative_prompt is None else
            [r[2] for r in rows], num_images=1, seed=[r[3] for r in rows], output="np", callback=after_step,
            **{name: getattr(request, name) for name in PASS_FIELDS},
        )  # fmt: skip
        elapsed = (time.perf_counter() - begin) * 1000
        missed: set[str] = set()
        if request.kv_cache:  # batches run one at a time: what the cache made since is this pass's
            count = self.kv_cache.made - made
            missed = {key[0] for key in list(self.kv_cache.made_keys)[len(self.kv_cache.made_keys) - count :]}
            _count(self.kv_misses, count)
            _count(self.kv_hits, len({prepared.identity.digest() for _, prepared in members}) - count)
            _count(self.kv_evictions, self.kv_cache.evicted - evicted)
        self.pass_images.observe(len(rows))
        results, start = [], 0
        for index, prepared in members:
            count = len(prepared.request.seed)
            hit = prepared.identity.digest() not in missed if request.kv_cache else None
            mine = list(images[start : start + count])
            results.append((index, Outcome(images=mine, seeds=prepared.request.seed, replica=self.replica, kv_cache_hit=hit,
                                           pass_images=len(rows), generate_ms=elapsed)))
            start += count
        return results

    # ------------------------------------------------------------------ identities
    def _identity(self, job: Job) -> Identity:
        if job.identity is None:
            return self.model.encode_face(job.photos, crop=job.crop, face_resize=job.face_resize)
        stamp = _stamp(self.store.path(job.identity))
        with self.resident_lock:
            if job.identity in self.resident and self.resident[job.identity][1] == stamp:
                self.resident.move_to_end(job.identity)
                return self.resident[job.identity][0]
        identity = self.store.load(job.identity, self.model.fingerprint)
        with self.resident_lock:
            replaced = self.resident.get(job.identity)
            if replaced is not None:  # its file was replaced since: the old face's K/V go too
                self._drop_kv(replaced[0])
            self.resident[job.identity] = (identity, stamp)
            while len(self.resident) > RESIDENT_IDENTITIES:
                self._drop_kv(self.resident.popitem(last=False)[1][0])
        return identity

    def _drop_changed(self) -> None:
        """Forget identities whose store file is gone or replaced, and their K/V (a deleted face leaves no trace)."""
        with self.resident_lock:
            for id_, (identity, stamp) in list(self.resident.items()):
                if _stamp(self.store.path(id_)) != stamp:
                    del self.resident[id_]
                    self._drop_kv(identity)

    def _drop_kv(self, identity: Identity) -> None:
        digest = identity.digest()
        self.kv_cache.discard(lambda key: key[0] == digest)  # kv_cache.cache_key: the digest first


def _count(counter: Counter, amount: int) -> None:
    if amount > 0:  # Ray's counters take positive increments only
        counter.inc(amount)


def _rows(request) -> list[tuple[str, str | None, int]]:
    """(prompt, negative prompt, seed) of each image of a request, in ``generate``'s order."""
    negatives = request.negative_prompt or [None] * len(request.prompt)
    return [(request.prompt[i // request.num_images], negatives[i // request.num_images], seed)
            for i, seed in enumerate(request.seed)]  # fmt: skip


def _stamp(path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns

