"""Lanes: an interactive-only worker is capacity that a batch job cannot fill (in process, embedded queue)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fewstep.engines.base import ImageItem, Slot
from fewstep.engines.noop import NoopEngine
from fewstep.service.queue.base import JobSpec
from fewstep.service.queue.embedded import EmbeddedQueue
from fewstep.service.queue.keys import BATCH, INTERACTIVE
from fewstep.service.settings import Settings
from fewstep.service.worker import Worker, build_workers


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


def run_workers(
    queue: EmbeddedQueue,
    engine: NoopEngine,
    interactive_workers: int,
    set_threads: Callable[[int], None] | None = None,
    **fields: Any,
) -> list[Worker]:
    """A process's workers as the gateway builds them (`build_workers`), on 2 cores' worth of threads."""
    settings = Settings(**{"max_batch_size": 4, "interactive_workers": interactive_workers, "api_keys": [], **fields})
    workers = build_workers(queue, lambda _m: engine, settings, None, "proc", 1, None, None, None, set_threads)
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


class Recorded(NoopEngine):
    """Records the size of every batched step, and the intra-op threads each engine thread had for it."""

    def __init__(self) -> None:
        super().__init__(model="shapes", step_s=0.05)
        self.steps: list[tuple[int, int, int]] = []
        self.threads: dict[int, int] = {}

    def set_threads(self, n: int) -> None:
        self.threads[threading.get_ident()] = n

    def advance(self, slots: list[Slot]) -> None:
        me = threading.get_ident()
        self.steps.append((me, len(slots), self.threads.get(me, 0)))
        super().advance(slots)


def test_without_batch_work_the_interactive_lane_runs_in_one_batch_on_every_core() -> None:
    """The interactive-only worker stands beside batch steps only: with none running, two workers used to split
    every batch of synchronous requests in two, on half the cores each (0.60× the diffusers pipeline's
    throughput for a user's student)."""
    engine, queue = Recorded(), EmbeddedQueue({INTERACTIVE: 64, BATCH: 64})
    workers = run_workers(queue, engine, 1, engine.set_threads, threads=None, max_batch_size=8)
    try:
        jobs = [queue.submit(JobSpec("bob", "shapes", items(1, f"square {i}", 4), INTERACTIVE, 600)) for i in range(8)]
        assert all(ended(queue, j.id, 30.0) for j in jobs)
        ran = {thread for thread, _, _ in engine.steps}
        assert ran == {workers[0]._threads[0].ident}, engine.steps  # the general worker alone
        assert {threads for _, _, threads in engine.steps} == {Settings().intra_op_threads(1)}  # every core
        assert max(size for _, size, _ in engine.steps) == 8
    finally:
        for w in workers:
            w.stop()
        queue.close()


def test_beside_a_batch_step_each_engine_thread_has_its_share_of_the_cores(engine: HeldEngine) -> None:
    """While batch items run, the interactive-only worker's share of the cores is kept for synchronous requests;
    once only the interactive lane is left, the general worker has them all again."""
    threads: dict[int | None, list[int]] = {}

    def set_threads(n: int) -> None:
        threads.setdefault(threading.get_ident(), []).append(n)

    queue = EmbeddedQueue({INTERACTIVE: 16, BATCH: 64})
    workers = run_workers(queue, engine, 1, set_threads, threads=None)
    full, shared = Settings().intra_op_threads(1), Settings().intra_op_threads(Settings().engine_threads(1))
    try:
        flood = queue.submit(JobSpec("alice", "shapes", items(4, "held batch item", 1), BATCH, ttl_s=600))
        assert engine.holding.wait(30)
        sync = queue.submit(JobSpec("bob", "shapes", items(1, "a blue square", 1), INTERACTIVE, ttl_s=600))
        assert ended(queue, sync.id, 30.0)
        general, reserved = (w._threads[0].ident for w in workers)
        assert threads[general] == [full, shared]  # every core idle; its share from its first batch step
        assert threads[reserved] == [shared]
        engine.release.set()
        assert ended(queue, flood.id, 30.0)
        after = queue.submit(JobSpec("bob", "shapes", items(1, "a red circle", 1), INTERACTIVE, ttl_s=600))
        assert ended(queue, after.id, 30.0)
        deadline = time.monotonic() + 30  # the interactive lane alone: every core again, at its next boundary
        while threads[general][-1] != full and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threads[general][-1] == full
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
