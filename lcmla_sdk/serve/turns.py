"""The replica's passes, one at a time, each taking every request that waited for it.

``@serve.batch`` (Ray 2.60) forms a batch once its first request has waited ``batch_wait_s`` or the batch is full,
whether or not the replica is free, and hands each formed batch on at once. With a pass running, requests that
arrive apart become batches of one, each waiting for its own pass: under a steady stream every pass ran one image
(seen on the tiny preset: 12 requests 150 ms apart, passes of 0.5 s, twelve passes of one). So the batches Ray hands
over wait here, and when a pass ends the next one takes every request waiting, up to the batch size, in arrival
order. Ray still forms the batches, with its wait when the replica is idle; this only decides what the next pass takes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")


class PassTurns(Generic[Job, Outcome]):
    """Runs ``run`` (a list of jobs -> their outcomes, in order; called on a worker thread) one pass at a time over
    the jobs :meth:`submit` hands in, at most ``max_jobs`` per pass. ``skip(job)``, asked when a pass takes the job:
    its outcome without a pass (e.g. its deadline has passed: Ray cancels a request whose client gave up, but not the
    batch it came in), or ``None``. Lives on one event loop (the replica's)."""

    def __init__(self, run: Callable[[list[Job]], Sequence[Outcome]], max_jobs: int,
                 skip: Callable[[Job], Outcome | None] = lambda job: None) -> None:  # fmt: skip
        self.run = run
        self.max_jobs = max_jobs
        self.skip = skip
        self._waiting: deque[tuple[Job, asyncio.Future]] = deque()
        self._passes: asyncio.Task | None = None

    async def submit(self, jobs: Sequence[Job]) -> list[Outcome]:
        """The outcomes of ``jobs``, once the passes that took them have run."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures))
        if self._passes is None or self._passes.done():
            self._passes = asyncio.create_task(self._run_passes())
        return list(await asyncio.gather(*futures))

    async def _run_passes(self) -> None:
        while self._waiting:
            taken: list[tuple[Job, asyncio.Future]] = []
            while self._waiting and len(taken) < self.max_jobs:
                job, future = self._waiting.popleft()
                if future.cancelled():  # its batch was cancelled (the replica stopping): no pass for it
                    continue
                skipped = self.skip(job)
                if skipped is None:
                    taken.append((job, future))
                else:
                    future.set_result(skipped)
            if not taken:
                continue
            try:
                outcomes = await asyncio.to_thread(self.run, [job for job, _ in taken])
            except Exception as error:  # the requests of this pass get the error; the next pass still runs
                for _, future in taken:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(taken, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
