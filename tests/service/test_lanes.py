"""Lanes: an interactive-only worker is capacity that a batch job cannot fill (in process, embedded queue)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fewstep.engines.base import ImageItem, Slot
from fewstep.engines.noop import NoopEngine
from fewstep.service.queue.base import JobSpec
from fewstep.service.queue.embedded import EmbeddedQueue
from fewstep.service.queue.keys import BATCH, INTERACTIVE
from fewstep.service.settings import Settings
from fewstep.service.worker import Worker


class HeldEngine(NoopEngine):
    """A no-op engine whose steps of "held" prompts wait until `release` is set: a long batch step."""

    def __init__(self) -> None:
        super().__init__(model="shapes")
        self.release = threading.Event()
        self.holding = threading.Event()

    def advance(self, slots: list[Slot]) -> None:
        if any(s.item.prompt.startswith("held") for s in slots):
            self.holding.set()
            self.release.wait(60)
        super().advance(slots)


def ended(queue: EmbeddedQueue, job_id: str, within_s: float) -> bool:
    """Whether the job's end event arrives within `within_s` (waits on the queue's events, not a timer)."""
    deadline = time.monotonic() + within_s
    cursor = "0"
    while (left := deadline - time.monotonic()) > 0:
        events = queue.events(job_id, cursor, left)
        if any(e.kind == "end" for e in events):
            return True
        cursor = events[-1].cursor if events else cursor
    return False


def items(n: int, prompt: str, steps: int) -> list[ImageItem]:
    return [ImageItem(prompt=prompt, seed=i, steps=steps) for i in range(n)]


@pytest.fixture
def engine() -> Iterator[HeldEngine]:
    e = HeldEngine()
    yield e
    e.release.set()


def run_workers(queue: EmbeddedQueue, engine: HeldEngine, interactive_workers: int) -> list[Worker]:
    settings = Settings(max_batch_size=4, interactive_workers=interactive_workers, api_keys=[])
    workers = [Worker(queue, lambda _m: engine, settings, name="general")]
    workers += [
        Worker(queue, lambda _m: engine, settings, name=f"interactive-{i}", lanes=(INTERACTIVE,))
        for i in range(interactive_workers)
    ]
    for w in workers:
        w.start()
    return workers


@pytest.mark.parametrize("interactive_workers", [1, 0])
def test_a_synchronous_request_is_served_while_a_batch_step_holds_the_general_worker(
    engine: HeldEngine, interactive_workers: int
) -> None:
    queue = EmbeddedQueue({INTERACTIVE: 16, BATCH: 64})
    workers = run_workers(queue, engine, interactive_workers)
    try:
        flood = queue.submit(JobSpec("alice", "shapes", items(40, "held batch item", 4), BATCH, ttl_s=600))
        assert engine.holding.wait(30), "the general worker never started the batch job"
        sync = queue.submit(JobSpec("bob", "shapes", items(1, "a blue square", 1), INTERACTIVE, ttl_s=600))
        if interactive_workers:
            # Served beside the held batch step: the flood has not moved at all.
            assert ended(queue, sync.id, 30.0)
            assert queue.status(sync.id, "bob").status == "succeeded"
            assert queue.status(flood.id, "alice").done == 0
        else:
            # One worker for both lanes: the request waits behind the batch step (what isolation fixes).
            assert not ended(queue, sync.id, 2.0)
            assert queue.status(sync.id, "bob").status == "queued"
        engine.release.set()
        assert ended(queue, sync.id, 30.0)
    finally:
        engine.release.set()
        for w in workers:
            w.stop()
        queue.close()


def test_an_interactive_only_worker_never_takes_batch_items(engine: HeldEngine) -> None:
    queue = EmbeddedQueue({INTERACTIVE: 16, BATCH: 64})
    engine.release.set()
    [reserved] = [Worker(queue, lambda _m: engine, Settings(api_keys=[]), name="i", lanes=(INTERACTIVE,))]
    reserved.start()
    try:
        job = queue.submit(JobSpec("alice", "shapes", items(3, "a red circle", 1), BATCH, ttl_s=600))
        sync = queue.submit(JobSpec("bob", "shapes", items(1, "a blue square", 1), INTERACTIVE, ttl_s=600))
        assert ended(queue, sync.id, 30.0)
        assert queue.status(job.id, "alice").status == "queued"
        assert queue.stats().depth[BATCH] == 3
    finally:
        reserved.stop()
        queue.close()
