"""The event hub: hundreds of waiters on one thread, each handed its own job's events (embedded and Redis)."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator

import pytest

from fewstep.engines.base import ImageItem
from fewstep.service.events import EventHub
from fewstep.service.queue.base import ItemResult, JobQueue, JobSpec
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
