"""The event hub: hundreds of waiters on one thread, each handed its own job's events (embedded and Redis)."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator

import pytest

from fewstep.engines.base import ImageItem
from fewstep.errors import InvalidRequest, NotReady
from fewstep.service.events import EventHub
from fewstep.service.queue.base import ItemResult, JobEvent, JobQueue, JobSpec
from fewstep.service.queue.embedded import EmbeddedQueue
from fewstep.service.queue.keys import BATCH, INTERACTIVE
from fewstep.service.queue.redis import RedisQueue

DEPTH = {INTERACTIVE: 64, BATCH: 64}


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.slow)])
def queue(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    if request.param == "embedded":
        q: JobQueue = EmbeddedQueue(DEPTH)
    else:
        q = RedisQueue(request.getfixturevalue("redis_server").url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    yield q
    q.close()


def submit(queue: JobQueue, n: int) -> str:
    items = [ImageItem(prompt="a red circle", seed=i, steps=1) for i in range(n)]
    return queue.submit(JobSpec("alice", "shapes", items, BATCH, ttl_s=600)).id


def finish_all(queue: JobQueue) -> None:
    for d in queue.claim("w", 64, 1.0, 0.0):
        queue.finish([(d, ItemResult(index=d.work.index, outcome="ok", seed=0, b64_json="png"))])


def test_hundreds_of_waiters_share_one_thread_and_each_gets_its_jobs_events(queue: JobQueue) -> None:
    hub = EventHub(queue)
    jobs = [submit(queue, 2) for _ in range(3)]

    async def scenario() -> list[list[str]]:
        before = threading.active_count()
        waits = [asyncio.ensure_future(hub.next(jobs[i % 3], "0", 30.0)) for i in range(300)]
        while hub.waiting < 300:
            await asyncio.sleep(0.01)
        assert threading.active_count() == before  # a waiter is a future, not a thread
        await asyncio.to_thread(finish_all, queue)
        got = await asyncio.gather(*waits)
        return [[e.kind for e in events] for events in got]

    try:
        kinds = asyncio.run(scenario())
    finally:
        hub.close()
    assert len(kinds) == 300 and all(k and set(k) <= {"item", "end"} for k in kinds)
    assert hub.waiting == 0


def test_a_waiter_after_the_events_gets_them_at_once_and_a_quiet_job_times_out_empty(queue: JobQueue) -> None:
    hub = EventHub(queue, block_s=5.0)  # long reads: a new waiter must interrupt the one in progress
    done = submit(queue, 1)
    finish_all(queue)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        idle = asyncio.ensure_future(hub.next("no-such-job-000", "0", 0.3))
        await asyncio.sleep(0.05)  # the hub is now in a long read for the idle waiter
        first = await asyncio.wait_for(hub.next(done, "0", 30.0), 2.0)
        later = await hub.next(done, first[0].cursor, 30.0)
        return [e.kind for e in first], [e.kind for e in later], [e.kind for e in await idle]

    try:
        first, later, idle = asyncio.run(scenario())
    finally:
        hub.close()
    assert first[0] == "item" and "end" in first + later and idle == []


def test_a_cursor_the_queue_cannot_read_is_refused_and_never_stalls_the_neighbours(queue: JobQueue) -> None:
    """`1-2` is a Redis id but no embedded counter; a 20-digit part is past Redis' 64 bits. Either, had it joined
    the shared read, broke that read for every waiter of the gateway."""
    bad = "99999999999999999999-0" if isinstance(queue, RedisQueue) else "1-2"
    assert not queue.valid_cursor(bad) and queue.valid_cursor("0")
    hub = EventHub(queue, block_s=0.2)
    stalled, neighbour = submit(queue, 1), submit(queue, 1)

    async def scenario() -> tuple[BaseException | list[JobEvent], list[str]]:
        spoiler = asyncio.ensure_future(hub.next(stalled, bad, 60.0))
        await asyncio.sleep(0.3)  # (had it been taken, it is now in the shared read)
        waiting = asyncio.ensure_future(hub.next(neighbour, "0", 60.0))
        await asyncio.to_thread(finish_all, queue)
        got = await asyncio.wait_for(waiting, 30.0)
        refused = (await asyncio.gather(spoiler, return_exceptions=True))[0]
        return refused, [e.kind for e in got]

    try:
        refused, kinds = asyncio.run(scenario())
    finally:
        hub.close()
    assert isinstance(refused, InvalidRequest) and "Last-Event-ID" in str(refused)
    assert kinds and kinds[0] == "item"


class _OneJobUnreadable(EmbeddedQueue):
    """A queue whose read of one job raises, as a cursor or a stream the checks let through would."""

    def __init__(self, broken: str = "") -> None:
        super().__init__(DEPTH)
        self.broken = broken
        self.interrupts: list[str] = []

    def watch(self, cursors: dict[str, str], block_s: float) -> dict[str, list[JobEvent]]:
        if self.broken in cursors:
            raise ValueError("unreadable")
        return super().watch(cursors, block_s)

    def interrupt(self) -> None:
        self.interrupts.append(threading.current_thread().name)
        super().interrupt()


def test_a_job_whose_read_fails_fails_its_own_waiters_and_no_other() -> None:
    queue = _OneJobUnreadable()
    queue.broken = submit(queue, 1)
    fine = submit(queue, 1)
    hub = EventHub(queue, block_s=0.2)

    async def scenario() -> tuple[BaseException | list[JobEvent], list[str]]:
        doomed = asyncio.ensure_future(hub.next(queue.broken, "0", 60.0))
        waiting = asyncio.ensure_future(hub.next(fine, "0", 60.0))
        await asyncio.to_thread(finish_all, queue)
        got = await asyncio.wait_for(waiting, 30.0)
        return (await asyncio.gather(doomed, return_exceptions=True))[0], [e.kind for e in got]

    try:
        failed, kinds = asyncio.run(scenario())
    finally:
        hub.close()
    assert isinstance(failed, NotReady) and kinds and kinds[0] == "item"
    assert hub.waiting == 0


def test_waiters_interrupt_the_read_from_the_hubs_thread_once_per_read_not_each() -> None:
    """The interrupt is a Redis write with Redis: never on the event loop, and not one per waiter (a waiting
    request used to make a new waiter, and an interrupt, four times a second)."""
    queue = _OneJobUnreadable()
    jobs = [submit(queue, 1) for _ in range(3)]
    hub = EventHub(queue, block_s=5.0)

    async def scenario() -> tuple[str, list[list[JobEvent]], list[str]]:
        loop_thread = threading.current_thread().name
        waits = [asyncio.ensure_future(hub.next(jobs[i % 3], "0", 0.6, gone=_stays)) for i in range(200)]
        return loop_thread, await asyncio.gather(*waits), list(queue.interrupts)

    try:
        loop_thread, got, interrupts = asyncio.run(scenario())
    finally:
        hub.close()
    assert got == [[]] * 200  # nothing happened to the jobs: each waited its time out, polled, not re-made
    assert interrupts and loop_thread not in interrupts
    assert len(interrupts) <= 10, len(interrupts)


async def _stays() -> bool:
    return False
