"""PassTurns: a replica's passes run one at a time, and each takes every request that waited for it (up to the batch
size), whichever batches Ray Serve handed them over in. No Ray here: the event loop and the worker thread are real."""

import asyncio
import threading

import pytest

from lcmla_sdk.serve.turns import PassTurns

LIMIT_S = 10  # a wrong PassTurns fails here instead of hanging the suite


class Passes:
    """A pass that records its jobs and how many passes ran at once; the first one holds until released, as a long
    GPU pass would."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.taken: list[list[str]] = []
        self.release = threading.Event()
        self.fail_on = fail_on
        self.running = self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, jobs: list[str]) -> list[str]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if not self.taken:
                self.release.wait(LIMIT_S)
            self.taken.append(list(jobs))
            if self.fail_on in jobs:
                raise RuntimeError(f"pass of {jobs} failed")
            return [f"image of {job}" for job in jobs]
        finally:
            with self.lock:
                self.running -= 1


async def _while_first_pass_runs(turns: PassTurns, passes: Passes, later: list[list[str]]):
    first = asyncio.create_task(turns.submit(["a"]))
    await asyncio.sleep(0.05)  # the first pass has started and holds
    batches = [asyncio.create_task(turns.submit(jobs)) for jobs in later]  # each as Ray hands a batch over
    await asyncio.sleep(0.05)
    passes.release.set()
    return await asyncio.wait_for(asyncio.gather(first, *batches, return_exceptions=True), LIMIT_S)


def test_batches_that_arrive_during_a_pass_share_the_next_one():
    passes = Passes()
    results = asyncio.run(_while_first_pass_runs(PassTurns(passes, 8), passes, [["b"], ["c"], ["d", "e"]]))
    assert passes.taken == [["a"], ["b", "c", "d", "e"]] and passes.most_at_once == 1
    assert results == [["image of a"], ["image of b"], ["image of c"], ["image of d", "image of e"]]


def test_a_pass_takes_at_most_the_batch_size_in_arrival_order():
    passes = Passes()
    asyncio.run(_while_first_pass_runs(PassTurns(passes, 3), passes, [["b"], ["c", "d"], ["e"]]))
    assert passes.taken == [["a"], ["b", "c", "d"], ["e"]] and passes.most_at_once == 1


def test_a_failed_pass_fails_its_own_requests_only():
    passes = Passes(fail_on="c")
    results = asyncio.run(_while_first_pass_runs(PassTurns(passes, 2), passes, [["b"], ["c"], ["d"]]))
    assert passes.taken == [["a"], ["b", "c"], ["d"]]
    assert results[0] == ["image of a"] and results[3] == ["image of d"]
    for failed in results[1:3]:
        assert isinstance(failed, RuntimeError) and "['b', 'c']" in str(failed)


def test_a_job_that_needs_no_pass_any_more_is_answered_without_one():
    passes = Passes()
    late = {"c"}  # e.g. its deadline passed while it waited
    turns = PassTurns(passes, 8, skip=lambda job: f"too late for {job}" if job in late else None)
    results = asyncio.run(_while_first_pass_runs(turns, passes, [["b", "c"], ["d"]]))
    assert passes.taken == [["a"], ["b", "d"]]
    assert results == [["image of a"], ["image of b", "too late for c"], ["image of d"]]


def test_a_batch_cancelled_while_it_waits_gets_no_pass():
    passes = Passes()

    async def scenario():
        turns = PassTurns(passes, 8)
        first = asyncio.create_task(turns.submit(["a"]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(turns.submit(["b"]))  # e.g. the replica stopping cancels its batch
        kept = asyncio.create_task(turns.submit(["c"]))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        passes.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await asyncio.wait_for(first, LIMIT_S), await asyncio.wait_for(kept, LIMIT_S)

    assert asyncio.run(scenario()) == (["image of a"], ["image of c"])
    assert passes.taken == [["a"], ["c"]]
