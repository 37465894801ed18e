"""One conformance suite for every `JobQueue`: the embedded queue and Redis Streams (real redis-server).

Each Redis test gets its own key prefix, so tests share one server without seeing each other.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from fewstep.engines.base import ImageItem, StreamRequest
from fewstep.errors import Conflict, NotFound, NotReady, Overloaded
from fewstep.service.queue.base import ItemResult, JobQueue, JobSpec
from fewstep.service.queue.embedded import EmbeddedQueue
from fewstep.service.queue.keys import BATCH, INTERACTIVE, VIDEO
from fewstep.service.queue.redis import RedisQueue
from tests.conftest import RedisServer

DEPTH = {INTERACTIVE: 8, BATCH: 20, VIDEO: 4}


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.slow)])
def queue(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    if request.param == "embedded":
        q: JobQueue = EmbeddedQueue(DEPTH)
    else:
        server = request.getfixturevalue("redis_server")
        q = RedisQueue(server.url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    yield q
    q.close()


def spec(n: int, lane: str = BATCH, owner: str = "alice", key: str | None = None, fp: str = "body") -> JobSpec:
    items = [ImageItem(prompt=f"a red circle {i}", seed=i, steps=1 + i % 4) for i in range(n)]
    return JobSpec(owner, "shapes", items, lane, ttl_s=600, idempotency_key=key, fingerprint=fp)


def ok(index: int, seed: int) -> ItemResult:
    return ItemResult(index=index, outcome="ok", seed=seed, steps=1, nfe=1, b64_json="png")


def test_submit_claim_finish_round_trip(queue: JobQueue) -> None:
    job = queue.submit(spec(3))
    assert (job.status, job.total, job.done) == ("queued", 3, 0)
    taken = queue.claim("w1", 10, 1.0, 0.0)
    assert [d.work.index for d in taken] == [0, 1, 2]
    assert taken[1].work.item == ImageItem(prompt="a red circle 1", seed=1, steps=2)
    assert queue.status(job.id, "alice").status == "running"
    for d in taken:
        assert queue.finish([(d, ok(d.work.index, d.work.item.seed))])[0].wrote
    st = queue.status(job.id, "alice")
    assert (st.status, st.done, st.finished is not None) == ("succeeded", 3, True)
    assert [r.index for r in queue.results(job.id, "alice")] == [0, 1, 2]
    kinds = [e.kind for e in queue.events(job.id, "0", 0.1)]
    assert kinds == ["item", "item", "item", "end"]
    assert queue.stats().depth[BATCH] == 0  # acknowledged entries are gone


def test_a_result_is_written_once_whatever_the_redeliveries(queue: JobQueue) -> None:
    job = queue.submit(spec(1))
    [d] = queue.claim("w1", 1, 1.0, 0.0)
    first = queue.finish([(d, ok(0, 0))])[0]
    again = queue.finish([(d, ItemResult(index=0, outcome="failed", seed=0, error="late duplicate"))])[0]
    assert first.wrote and first.job_seconds is not None
    assert not again.wrote
    st = queue.status(job.id, "alice")
    assert (st.done, st.failed) == (1, 0)
    assert [r.outcome for r in queue.results(job.id, "alice")] == ["ok"]


def test_a_batch_of_results_is_written_item_by_item(queue: JobQueue) -> None:
    job = queue.submit(spec(2))
    d0, d1 = queue.claim("w1", 2, 1.0, 0.0)
    done = queue.finish([(d0, ok(0, 0)), (d0, ok(0, 0)), (d1, ok(1, 1))])
    assert [f.wrote for f in done] == [True, False, True]
    assert done[0].job_seconds is None and done[2].job_seconds is not None  # the last one completed the job
    assert queue.status(job.id, "alice").done == 2


def test_jobs_are_visible_only_to_their_owner(queue: JobQueue) -> None:
    job = queue.submit(spec(1))
    for call in (queue.status, queue.results, queue.cancel):
        with pytest.raises(NotFound):
            call(job.id, "mallory")
    with pytest.raises(NotFound):
        queue.status("../../etc/passwd", "alice")


def test_idempotency_key_returns_the_same_job_also_when_concurrent(queue: JobQueue) -> None:
    first = queue.submit(spec(2, key="k1"))
    assert queue.submit(spec(2, key="k1")).id == first.id
    assert queue.submit(spec(2, key="k1", owner="bob")).id != first.id  # keys are per owner
    with pytest.raises(Conflict):
        queue.submit(spec(2, key="k1", fp="another body"))
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        ids.append(queue.submit(spec(1, key="k2")).id)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert queue.stats().depth[BATCH] == 2 + 2 + 1


def test_full_lane_refuses_whole_jobs_and_recovers(queue: JobQueue) -> None:
    queue.submit(spec(6, lane=INTERACTIVE))
    with pytest.raises(Overloaded) as e:
        queue.submit(spec(3, lane=INTERACTIVE))
    assert "limit of 8" in str(e.value) and e.value.retry_after > 0
    assert queue.stats().depth[INTERACTIVE] == 6  # nothing of the refused job was queued
    queue.submit(spec(20, lane=BATCH))  # lanes are limited apart
    for d in queue.claim("w1", 6, 1.0, 0.0):
        queue.finish([(d, ok(d.work.index, 0))])
    queue.submit(spec(3, lane=INTERACTIVE))


def test_interactive_items_are_claimed_before_batch_items(queue: JobQueue) -> None:
    queue.submit(spec(3, lane=BATCH))
    sync = queue.submit(spec(2, lane=INTERACTIVE))
    taken = queue.claim("w1", 3, 1.0, 0.0)
    assert [d.work.job_id for d in taken[:2]] == [sync.id, sync.id]
    assert taken[2].lane == BATCH


def test_idle_items_are_reclaimed_unless_heartbeaten(queue: JobQueue) -> None:
    job = queue.submit(spec(2))
    a, _b = queue.claim("dead", 2, 1.0, 0.0)
    time.sleep(0.3)
    queue.heartbeat("dead", [a])  # `a` is still being worked on; `b`'s worker died
    taken = queue.reclaim("rescuer", 0.25, 3, 10)
    assert [(d.work.index, d.deliveries) for d in taken] == [(1, 2)]
    assert queue.finish([(taken[0], ok(1, 1))])[0].wrote
    assert queue.finish([(a, ok(0, 0))])[0].wrote
    assert queue.status(job.id, "alice").status == "succeeded"
    assert queue.stats().reclaims >= 1


def test_poison_items_go_to_the_dead_letter_record_after_the_cap(queue: JobQueue) -> None:
    job = queue.submit(spec(2))
    _poison, good = queue.claim("w0", 2, 1.0, 0.0)
    queue.finish([(good, ok(1, 1))])
    for attempt in range(2, 4):  # deliveries 2 and 3 are handed out; each worker "dies"
        time.sleep(0.15)
        [d] = queue.reclaim(f"w{attempt}", 0.1, 3, 10)
        assert (d.work.index, d.deliveries) == (0, attempt)
    time.sleep(0.15)
    assert queue.reclaim("w4", 0.1, 3, 10) == []  # the 4th delivery would pass the cap
    st = queue.status(job.id, "alice")
    assert (st.status, st.done, st.failed) == ("failed", 1, 1)
    [err] = [r for r in queue.results(job.id, "alice") if r.outcome == "failed"]
    assert err.index == 0 and "max_deliveries" in (err.error or "")
    assert queue.stats().dead == 1
    [dead] = queue.dead_letters()
    assert (dead["job"], dead["index"], dead["deliveries"]) == (job.id, "0", "3")


def test_cancel_marks_the_job_and_workers_can_see_it(queue: JobQueue) -> None:
    job = queue.submit(spec(3))
    other = queue.submit(spec(1))
    st = queue.cancel(job.id, "alice")
    assert st.status == "cancelled"
    assert queue.cancelled({job.id, other.id}) == {job.id}
    assert queue.cancel(job.id, "alice").status == "cancelled"  # idempotent
    kinds = [e.kind for e in queue.events(job.id, "0", 0.1)]
    assert kinds == ["cancel"]


def test_events_wait_for_progress_and_resume_from_a_cursor(queue: JobQueue) -> None:
    job = queue.submit(spec(2))
    [d0, d1] = queue.claim("w1", 2, 1.0, 0.0)
    t0 = time.monotonic()
    assert queue.events(job.id, "0", 0.2) == []
    assert time.monotonic() - t0 >= 0.15
    threading.Timer(0.1, lambda: queue.finish([(d0, ok(0, 0))])).start()
    [first] = queue.events(job.id, "0", 5.0)
    assert (first.kind, first.index, first.outcome) == ("item", 0, "ok")
    queue.finish([(d1, ok(1, 1))])
    assert [e.kind for e in queue.events(job.id, first.cursor, 0.1)] == ["item", "end"]


def test_partial_images_are_events_of_a_running_item_and_none_follow_its_result(queue: JobQueue) -> None:
    job = queue.submit(spec(2))
    [d0, d1] = queue.claim("w1", 2, 1.0, 0.0)
    queue.partial(job.id, 0, 0, "cG5nMA==")
    queue.partial(job.id, 1, 0, "cG5nMQ==")
    queue.finish([(d0, ok(0, 0))])
    queue.partial(job.id, 0, 1, "bGF0ZQ==")  # after its result: dropped
    queue.partial(job.id, 1, 1, "cG5nMg==")
    queue.partial("no-such-job-0000", 0, 0, "eA==")  # a job gone: nothing, no error
    queue.finish([(d1, ok(1, 1))])
    queue.partial(job.id, 1, 2, "bGF0ZQ==")  # after the end
    seen = [(e.kind, e.index, e.partial, e.data) for e in queue.events(job.id, "0", 0.1)]
    assert seen == [
        ("partial", 0, 0, "cG5nMA=="),
        ("partial", 1, 0, "cG5nMQ=="),
        ("item", 0, None, None),
        ("partial", 1, 1, "cG5nMg=="),
        ("item", 1, None, None),
        ("end", None, None, None),
    ]


def test_a_finished_jobs_webhook_is_scheduled_leased_retried_and_forgotten(queue: JobQueue) -> None:
    import dataclasses

    hooked = queue.submit(dataclasses.replace(spec(2), webhook="https://hooks.example/ends?t=1"))
    plain = queue.submit(spec(1))
    taken = queue.claim("w1", 10, 1.0, 0.0)
    assert queue.webhooks_due(time.time() + 1, 30, 10) == []  # nothing finished yet
    queue.finish([(d, ok(d.work.index, d.work.item.seed)) for d in taken if d.work.job_id == plain.id])
    [first] = [d for d in taken if d.work.job_id == hooked.id and d.work.index == 0]
    [second] = [d for d in taken if d.work.job_id == hooked.id and d.work.index == 1]
    queue.finish([(first, ok(0, 0))])
    assert queue.webhooks_due(time.time() + 1, 30, 10) == []
    failed = ItemResult(index=1, outcome="failed", seed=1, error="boom")
    queue.finish([(second, failed)])
    [due] = queue.webhooks_due(time.time() + 1, 30, 10)
    assert (due.id, due.job, due.owner, due.url, due.model) == (
        f"msg_{hooked.id}",
        hooked.id,
        "alice",
        "https://hooks.example/ends?t=1",
        "shapes",
    )
    assert (due.counts, due.state, due.attempts) == ((2, 1, 1, 0), "failed", 0) and due.finished >= due.created
    assert queue.webhooks_due(time.time() + 1, 30, 10) == []  # leased: not handed out again meanwhile
    assert [d.id for d in queue.webhooks_due(time.time() + 31, 30, 10)] == [due.id]  # the lease ran out
    queue.webhook_retry(due, time.time() + 100)
    assert queue.webhooks_due(time.time() + 50, 30, 10) == []
    [again] = queue.webhooks_due(time.time() + 101, 30, 10)
    assert again.attempts == 1 and again.id == due.id
    queue.webhook_done(again)
    assert queue.webhooks_due(time.time() + 10_000, 30, 10) == []


def test_stats_report_depth_in_flight_and_workers(queue: JobQueue) -> None:
    queue.submit(spec(4))
    queue.claim("w1", 1, 1.0, 0.0)
    time.sleep(0.05)
    st = queue.stats()
    assert st.depth[BATCH] == 4 and st.in_flight == 1 and st.workers == 1
    assert st.oldest_age_s >= 0.04


def test_a_worker_claims_and_reclaims_only_its_lanes(queue: JobQueue) -> None:
    batch = queue.submit(spec(2, BATCH))
    sync = queue.submit(spec(1, INTERACTIVE, owner="bob"))
    [d] = queue.claim("reserved", 10, 1.0, 0.0, lanes=(INTERACTIVE,))
    assert (d.work.job_id, d.lane) == (sync.id, INTERACTIVE)
    assert queue.claim("reserved", 10, 0.2, 0.0, lanes=(INTERACTIVE,)) == []  # batch items stay queued
    taken = queue.claim("general", 10, 1.0, 0.0)
    assert {t.work.job_id for t in taken} == {batch.id}
    time.sleep(0.3)  # let every claimed item go idle past the reclaim threshold below
    again = queue.reclaim("reserved", 0.25, 3, 10, lanes=(INTERACTIVE,))
    assert [(r.work.job_id, r.lane) for r in again] == [(sync.id, INTERACTIVE)]


def test_one_owner_cannot_queue_past_its_cost_limit_and_gets_it_back_as_items_finish(queue: JobQueue) -> None:
    def limited(n: int, owner: str) -> JobSpec:
        items = [ImageItem(prompt="a red circle", seed=i, steps=4, hybrid=i == 0) for i in range(n)]
        return JobSpec(owner, "shapes", items, BATCH, ttl_s=600, owner_limit=12)

    queue.submit(limited(2, "alice"))  # 5 + 4 evaluations: the hybrid item's teacher counts
    with pytest.raises(Overloaded, match=r"9 network evaluations .* adds 5, over the per-key limit of 12"):
        queue.submit(limited(1, "alice"))
    queue.submit(limited(2, "bob"))  # another key's budget is its own
    taken = [d for d in queue.claim("w1", 10, 1.0, 0.0) if d.work.owner == "alice"]
    assert len(taken) == 2
    queue.finish([(taken[0], ok(taken[0].work.index, 0))])
    queue.finish([(taken[0], ok(taken[0].work.index, 0))])  # a second write gives nothing back twice
    with pytest.raises(Overloaded):
        queue.submit(limited(2, "alice"))  # 4 left + 9 > 12
    queue.submit(limited(1, "alice"))  # 4 + 5 ≤ 12


def test_an_owner_is_charged_the_costs_the_spec_counted_and_gets_exactly_those_back(queue: JobQueue) -> None:
    # A hybrid's teacher hand-off on the shipped pair costs 12 evaluations, not `item_cost`'s one.
    items = [ImageItem(prompt="a red circle", seed=i, steps=2, hybrid=i == 0) for i in range(2)]
    queue.submit(JobSpec("alice", "shapes", items, BATCH, ttl_s=600, owner_limit=20, costs=[13, 2]))
    with pytest.raises(Overloaded, match=r"15 network evaluations .* adds 13, over the per-key limit of 20"):
        queue.submit(JobSpec("alice", "shapes", items[:1], BATCH, ttl_s=600, owner_limit=20, costs=[13]))
    (hybrid,) = [d for d in queue.claim("w1", 10, 1.0, 0.0) if d.work.item.hybrid]
    assert hybrid.work.cost == 13  # the figure travels with the queued item
    queue.finish([(hybrid, ok(hybrid.work.index, 0))])
    queue.submit(JobSpec("alice", "shapes", items[:1], BATCH, ttl_s=600, owner_limit=15, costs=[13]))  # 2 + 13


@pytest.mark.slow
def test_redis_at_maxmemory_refuses_new_work_with_not_ready_and_a_result_waits_to_be_written(
    redis_server: RedisServer,
) -> None:
    queue = RedisQueue(redis_server.url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    admin = redis.Redis.from_url(redis_server.url)
    job = queue.submit(spec(1))
    [d] = queue.claim("w1", 1, 1.0, 0.0)
    admin.config_set("maxmemory", "1")  # noeviction (the default policy): every write is refused
    try:
        with pytest.raises(NotReady, match="maxmemory"):
            queue.submit(spec(1))
        with pytest.raises(NotReady, match="maxmemory"):
            queue.finish([(d, ok(0, 0))])  # the worker keeps the result and retries
    finally:
        admin.config_set("maxmemory", "0")
    assert queue.finish([(d, ok(0, 0))])[0].wrote  # written once memory is back
    assert queue.status(job.id, "alice").status == "succeeded"
    queue.close()


def test_one_owner_keeps_at_most_its_job_limit_and_a_forgotten_job_frees_its_place(queue: JobQueue) -> None:
    def one(owner: str) -> JobSpec:
        return JobSpec(owner, "shapes", [ImageItem(prompt="x", seed=0, steps=1)], BATCH, ttl_s=600, owner_jobs=2)

    first = queue.submit(one("alice"))
    queue.submit(one("alice"))
    with pytest.raises(Overloaded, match=r"2 batch jobs kept .* \(`key_max_stored_jobs` = 2\)"):
        queue.submit(one("alice"))
    queue.submit(one("bob"))  # per key
    queue.forget(first.id, "alice")
    queue.submit(one("alice"))


def test_owners_take_turns_so_a_flood_delays_another_key_by_a_turn_and_each_key_keeps_its_order(
    queue: JobQueue,
) -> None:
    flood = queue.submit(spec(12, owner="alice"))
    bob = queue.submit(spec(2, owner="bob"))
    carol = queue.submit(spec(1, owner="carol"))
    first = queue.claim("w1", 4, 1.0, 0.0)
    assert {d.work.owner for d in first} == {"alice", "bob", "carol"}  # each key's first item, in one batch
    assert sum(d.work.owner == "alice" for d in first) <= 2
    taken = first + queue.claim("w1", 4, 1.0, 0.0)
    assert {d.work.job_id for d in taken if d.work.owner != "alice"} == {bob.id, carol.id}
    assert sum(d.work.owner != "alice" for d in taken) == 3  # bob and carol done within two batches
    while more := queue.claim("w1", 4, 0.2, 0.0):
        taken += more
    assert [d.work.index for d in taken if d.work.job_id == flood.id] == list(range(12))  # FIFO within a key
    assert [d.work.index for d in taken if d.work.job_id == bob.id] == [0, 1]
    assert queue.stats().depth[BATCH] == 15  # all in flight, none lost or duplicated
    for d in taken:
        queue.finish([(d, ok(d.work.index, d.work.item.seed))])
    assert queue.stats().depth[BATCH] == 0
    assert queue.status(flood.id, "alice").status == "succeeded"


@pytest.mark.slow
def test_redis_keeps_the_backlog_where_autoscalers_count_it(redis_server: RedisServer) -> None:
    queue = RedisQueue(redis_server.url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    r = redis.Redis.from_url(redis_server.url)
    queue.submit(spec(12, owner="alice"))
    queue.submit(spec(3, owner="bob"))
    waiting, fed = r.llen(queue.keys.waiting(BATCH)), r.xlen(queue.keys.lane(BATCH))
    assert (waiting, fed) == (14, 1)  # a submit feeds one item to wake a blocked worker; the rest wait
    queue.claim("w1", 4, 1.0, 0.0)
    assert (r.llen(queue.keys.waiting(BATCH)), r.xlen(queue.keys.lane(BATCH))) == (11, 4)
    queue.close()


@pytest.mark.parametrize("kind", ["embedded", pytest.param("redis", marks=pytest.mark.slow)])
def test_the_dead_letter_record_keeps_only_the_newest(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewstep.service.queue import embedded as embedded_module
    from fewstep.service.queue import redis as redis_module

    monkeypatch.setattr(embedded_module, "DEAD_LETTERS_MAX", 3)
    monkeypatch.setattr(redis_module, "DEAD_LETTERS_MAX", 3)
    if kind == "embedded":
        q: JobQueue = EmbeddedQueue(DEPTH)
    else:
        q = RedisQueue(request.getfixturevalue("redis_server").url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    job = q.submit(spec(5))
    assert len(q.claim("dies", 5, 1.0, 0.0)) == 5
    time.sleep(0.15)
    assert q.reclaim("w2", 0.1, 1, 10) == []  # a second delivery would pass the cap of 1: all five are dead
    assert q.status(job.id, "alice").failed == 5  # every item's job learns it failed
    assert sorted(int(d["index"]) for d in q.dead_letters()) == [2, 3, 4]  # the record kept the newest 3
    q.close()


@pytest.mark.slow
def test_redis_reclaim_resumes_its_scan_so_items_taken_back_again_do_not_starve_later_ones(
    redis_server: RedisServer,
) -> None:
    queue = RedisQueue(redis_server.url, DEPTH, prefix=f"t{secrets.token_hex(4)}")
    queue.submit(spec(6))
    assert len(queue.claim("dies", 6, 1.0, 0.0)) == 6
    time.sleep(0.15)
    first = queue.reclaim("also-dies", 0.1, 10, 2)
    time.sleep(0.15)  # now every item is idle again, the two just taken back included
    second = queue.reclaim("rescuer", 0.1, 10, 2)
    assert [d.work.index for d in first] == [0, 1]
    assert [d.work.index for d in second] == [2, 3]  # from the cursor, not from the start again
    queue.close()


def clip(owner: str = "alice", key: str | None = None, frames: int = 8, limit: int | None = None) -> JobSpec:
    """A video (`POST /v1/videos`): one clip on the video lane, with what the gateway keeps beside it."""
    item = StreamRequest(prompt="a red circle moving left", frames=frames, steps=2, seed=7)
    meta = '{"seconds": "1"}'
    return JobSpec(owner, "shapes-video", [item], VIDEO, 600, key, "clip body", owner_limit=limit, meta=meta)


def test_a_clip_travels_on_the_video_lane_which_image_workers_never_claim(queue: JobQueue) -> None:
    video = queue.submit(clip())
    image = queue.submit(spec(1))
    assert (video.status, video.meta, video.progress) == ("queued", '{"seconds": "1"}', 0)
    assert [d.work.job_id for d in queue.claim("images", 10, 0.3, 0.0)] == [image.id]
    assert queue.claim("images", 10, 0.2, 0.0) == []  # the clip stays queued for a clip driver
    [d] = queue.claim("clips", 10, 1.0, 0.0, lanes=(VIDEO,))
    assert (d.lane, d.work.item) == (VIDEO, StreamRequest("a red circle moving left", 8, 2, 7))
    queue.heartbeat("clips", [d], (VIDEO,))
    assert queue.stats().workers == 1  # the image worker; a clip driver is none (it would hide their absence)
    queue.progress(video.id, 40)
    queue.progress(video.id, 20)  # progress never goes back
    st = queue.status(video.id, "alice")
    assert (st.status, st.progress, st.meta) == ("running", 40, '{"seconds": "1"}')
    assert st.expires is not None and st.expires > time.time() + 500
    assert queue.finish([(d, ItemResult(index=0, outcome="ok", seed=7, b64_json="bXA0"))])[0].wrote
    queue.progress(video.id, 60)  # too late: the job finished
    st = queue.status(video.id, "alice")
    assert (st.status, st.progress) == ("succeeded", 40)
    assert [r.b64_json for r in queue.results(video.id, "alice")] == ["bXA0"]
    queue.progress("no-such-job-0123", 10)  # a gone job is ignored


def test_an_owner_lists_only_its_own_jobs_of_one_lane_oldest_first(queue: JobQueue) -> None:
    first = queue.submit(clip())
    queue.submit(spec(1))  # a batch job: another lane
    queue.submit(clip(owner="bob"))
    second = queue.submit(clip())
    assert [st.id for st in queue.jobs("alice", VIDEO)] == [first.id, second.id]
    assert [st.meta for st in queue.jobs("alice", VIDEO)] == ['{"seconds": "1"}'] * 2
    queue.forget(first.id, "alice")
    assert [st.id for st in queue.jobs("alice", VIDEO)] == [second.id]
    assert queue.jobs("carol", VIDEO) == []


def test_clips_get_the_per_key_cost_limit_idempotency_and_the_dead_letter_record(queue: JobQueue) -> None:
    queue.submit(clip(frames=8, limit=30))  # 8 frames × (2 steps + the cache pass) = 24
    with pytest.raises(Overloaded, match=r"24 network evaluations of video work .*\(`key_max_job_cost`\)"):
        queue.submit(clip(frames=8, limit=30))
    again = queue.submit(clip(owner="bob", key="k1"))
    assert queue.submit(clip(owner="bob", key="k1")).id == again.id
    taken = queue.claim("dead", 10, 1.0, 0.0, lanes=(VIDEO,))
    assert len(taken) == 2 and all(d.work.cost == 24 for d in taken)
    for attempt in range(2, 4):
        time.sleep(0.15)
        assert len(queue.reclaim(f"w{attempt}", 0.1, 3, 10, lanes=(VIDEO,))) == 2
    time.sleep(0.15)
    assert queue.reclaim("w4", 0.1, 3, 10) == []  # an image worker's reclaim never takes clips
    assert queue.reclaim("w4", 0.1, 3, 10, lanes=(VIDEO,)) == []  # past the cap: dead-lettered
    st = queue.status(again.id, "bob")
    assert (st.status, st.failed) == ("failed", 1)
    assert {d["job"] for d in queue.dead_letters()} >= {again.id}
    queue.submit(clip(frames=8, limit=30))  # the dead clip's cost went back to its owner
