"""The embedded job queue: the `JobQueue` semantics in one process, with no Redis.

The default when `FEWSTEP_REDIS_URL` is unset. Workers are threads of the gateway process, so
a crash loses the whole process (and the queue with it): the embedded queue is for one machine
and for development. Its reclaim, heartbeat and dead-letter paths exist so that it keeps the
same contract as the Redis queue, which the conformance suite checks.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from fewstep.errors import NotFound, Overloaded
from fewstep.service.queue.base import (
    Delivery,
    ItemResult,
    JobEvent,
    JobSpec,
    JobStatus,
    QueueStats,
    WebhookDue,
    WorkItem,
    Written,
    idempotency_conflict,
    key_digest,
    owner_over_jobs,
    owner_over_limit,
    valid_job_id,
    webhook_id,
)
from fewstep.service.queue.keys import (
    DEAD_LETTERS_MAX,
    IDEMPOTENCY_TTL_S,
    IMAGE_LANES,
    LANES,
    WORKER_TTL_S,
    image_worker,
)

_CURSOR = re.compile(r"[0-9]{1,19}")
"""This queue's event ids: a counter."""


@dataclass
class _Job:
    spec: JobSpec
    id: str
    created: float
    expires: float
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    progress: int = 0
    results: dict[int, ItemResult] = field(default_factory=dict)
    events: list[JobEvent] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results.values() if r.outcome == outcome)

    def status(self) -> JobStatus:
        counts = (len(self.spec.items), self.count("ok"), self.count("failed"), self.count("cancelled"))
        times = (self.created, self.started, self.finished)
        more = (self.expires, self.progress, self.spec.meta)
        return JobStatus.of(self.id, self.spec.model, counts, times, self.cancel_requested, more)


@dataclass
class _Entry:
    delivery: Delivery
    consumer: str | None = None
    touched: float = 0.0


class EmbeddedQueue:
    """In-process `JobQueue`. Thread-safe; `claim` and `events` block on one condition variable."""

    in_process = True

    def __init__(self, max_depth: dict[str, int]) -> None:
        self.max_depth = max_depth
        self._cv = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._entries: dict[str, _Entry] = {}
        self._waiting: dict[str, collections.OrderedDict[str, collections.deque[str]]] = {
            lane: collections.OrderedDict() for lane in LANES
        }
        """Per lane, each owner's queued entries; the dict's order is the owners' turn order (fair admission)."""
        self._lane_items = dict.fromkeys(LANES, 0)
        self._owner_cost: collections.Counter[tuple[str, str]] = collections.Counter()
        self._owner_jobs: collections.Counter[tuple[str, str]] = collections.Counter()
        self._idempotency: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._dead: collections.deque[tuple[Delivery, str]] = collections.deque(maxlen=DEAD_LETTERS_MAX)
        self._workers: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._events = itertools.count(1)
        self._webhooks: dict[str, tuple[float, WebhookDue]] = {}  # id → (next attempt due, record)
        self._reclaims = self._retries = 0
        self._closed = False
        self._interrupted = False
        self._purged = 0.0

    # -- gateway side ------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobStatus:
        with self._cv:
            now = time.time()
            self._purge(now)
            if spec.idempotency_key is not None:
                known = self._idempotency.get((spec.owner, key_digest(spec.idempotency_key)))
                if known is not None and known[2] > now and known[0] in self._jobs:
                    if known[1] != spec.fingerprint:
                        raise idempotency_conflict(spec.idempotency_key)
                    return self._jobs[known[0]].status()
            depth = self._depth(spec.lane)
            limit = self.max_depth[spec.lane]
            if depth + len(spec.items) > limit:
                raise Overloaded(
                    f"queue full: {depth} {spec.lane} items queued, {len(spec.items)} more would pass the limit of "
                    f"{limit}",
                    retry_after=2.0,
                )
            outstanding = self._owner_cost[(spec.owner, spec.lane)]
            if spec.owner_limit is not None and outstanding + spec.cost > spec.owner_limit:
                raise owner_over_limit(spec, outstanding)
            kept = self._owner_jobs[(spec.owner, spec.lane)]
            if spec.owner_jobs is not None and kept >= spec.owner_jobs:
                self._purged = 0.0  # count again without the expired ones before refusing
                self._purge(now)
                kept = self._owner_jobs[(spec.owner, spec.lane)]
                if kept >= spec.owner_jobs:
                    raise owner_over_jobs(spec, kept)
            job = _Job(spec=spec, id=secrets.token_urlsafe(16), created=now, expires=now + spec.ttl_s)
            self._jobs[job.id] = job
            self._owner_jobs[(spec.owner, spec.lane)] += 1
            self._owner_cost[(spec.owner, spec.lane)] += spec.cost
            for index, item in enumerate(spec.items):
                entry_id = str(next(self._ids))
                work = WorkItem(
                    job.id, index, spec.model, item, spec.cost_of(index), spec.request_of(index), spec.owner
                )
                self._entries[entry_id] = _Entry(Delivery(entry_id=entry_id, lane=spec.lane, work=work, queued_at=now))
                self._waiting[spec.lane].setdefault(spec.owner, collections.deque()).append(entry_id)
            self._lane_items[spec.lane] += len(spec.items)
            if spec.idempotency_key is not None:
                digest = key_digest(spec.idempotency_key)
                self._idempotency[(spec.owner, digest)] = (job.id, spec.fingerprint, now + IDEMPOTENCY_TTL_S)
            self._cv.notify_all()
            return job.status()

    def _depth(self, lane: str) -> int:
        return self._lane_items[lane]

    def _job(self, job_id: str, owner: str | None) -> _Job:
        job = self._jobs.get(job_id) if valid_job_id(job_id) else None
        if job is None or job.expires < time.time() or (owner is not None and job.spec.owner != owner):
            raise NotFound(f"job {job_id!r} not found")
        return job

    def status(self, job_id: str, owner: str) -> JobStatus:
        with self._cv:
            return self._job(job_id, owner).status()

    def results(self, job_id: str, owner: str) -> list[ItemResult]:
        with self._cv:
            job = self._job(job_id, owner)
            return [job.results[i] for i in sorted(job.results)]

    def cancel(self, job_id: str, owner: str) -> JobStatus:
        with self._cv:
            job = self._job(job_id, owner)
            if not job.cancel_requested and not job.status().settled:
                job.cancel_requested = True
                self._event(job, "cancel")
            return job.status()

    def watch(self, cursors: dict[str, str], block_s: float) -> dict[str, list[JobEvent]]:
        deadline = time.monotonic() + block_s
        with self._cv:
            while True:
                out: dict[str, list[JobEvent]] = {}
                for job_id, cursor in cursors.items():
                    job = self._jobs.get(job_id)
                    fresh = [] if job is None else self._after(job, int(cursor or 0))
                    if fresh:
                        out[job_id] = fresh
                left = deadline - time.monotonic()
                if out or left <= 0 or self._closed or self._interrupted:
                    self._interrupted = False
                    return out
                self._cv.wait(left)

    def interrupt(self) -> None:
        with self._cv:
            self._interrupted = True
            self._cv.notify_all()

    def valid_cursor(self, cursor: str) -> bool:
        return bool(_CURSOR.fullmatch(cursor))

    def jobs(self, owner: str, lane: str) -> list[JobStatus]:
        with self._cv:
            now = time.time()
            kept = [
                j for j in self._jobs.values() if j.spec.owner == owner and j.spec.lane == lane and j.expires >= now
            ]
            return [j.status() for j in sorted(kept, key=lambda j: j.created)]

    def forget(self, job_id: str, owner: str) -> None:
        with self._cv:
            job = self._jobs.get(job_id)
            if job is not None and job.spec.owner == owner:
                self._drop(job_id)

    def events(self, job_id: str, cursor: str, block_s: float) -> list[JobEvent]:
        after = int(cursor or 0)
        deadline = time.monotonic() + block_s
        with self._cv:
            while True:
                fresh = self._after(self._job(job_id, None), after)
                left = deadline - time.monotonic()
                if fresh or left <= 0 or self._closed:
                    return fresh
                self._cv.wait(left)

    @staticmethod
    def _after(job: _Job, cursor: int) -> list[JobEvent]:
        return [e for e in job.events if int(e.cursor) > cursor]

    def stats(self) -> QueueStats:
        with self._cv:
            now = time.monotonic()
            flying = [e for e in self._entries.values() if e.consumer is not None]
            return QueueStats(
                depth={lane: self._depth(lane) for lane in LANES},
                in_flight=len(flying),
                oldest_age_s=max((now - e.touched for e in flying), default=0.0),
                dead=len(self._dead),
                reclaims=self._reclaims,
                retries=self._retries,
                workers=sum(1 for t in self._workers.values() if now - t < WORKER_TTL_S),
            )

    def ping(self) -> None:
        return None

    def dead_letters(self) -> list[dict[str, str]]:
        with self._cv:
            return [
                {
                    "job": d.work.job_id,
                    "index": str(d.work.index),
                    "item": d.work.encode(),
                    "deliveries": str(d.deliveries - 1),
                    "reason": reason,
                }
                for d, reason in self._dead
            ]

    # -- worker side -------------------------------------------------------------------------
    def claim(
        self, consumer: str, max_items: int, block_s: float, gather_s: float, lanes: tuple[str, ...] = IMAGE_LANES
    ) -> list[Delivery]:
        deadline = time.monotonic() + block_s
        with self._cv:
            if image_worker(lanes):
                self._workers[consumer] = time.monotonic()
            while not any(self._waiting[lane] for lane in lanes) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cv.wait(left)
            gather_end = time.monotonic() + gather_s
            while sum(len(q) for lane in lanes for q in self._waiting[lane].values()) < max_items and not self._closed:
                left = gather_end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            taken: list[Delivery] = []
            for lane in lanes:  # in the order given: interactive first
                owners = self._waiting[lane]
                while owners and len(taken) < max_items:
                    # Fair admission: one entry per owner in turn, so a key with 10 000 queued items
                    # delays another key's first item by one turn, not by 10 000 items.
                    owner, queue = next(iter(owners.items()))
                    entry = self._entries[queue.popleft()]
                    if queue:
                        owners.move_to_end(owner)
                    else:
                        del owners[owner]
                    entry.consumer, entry.touched = consumer, time.monotonic()
                    job = self._jobs.get(entry.delivery.work.job_id)
                    if job is not None and job.started is None:
                        job.started = time.time()
                    taken.append(entry.delivery)
            return taken

    def reclaim(
        self,
        consumer: str,
        min_idle_s: float,
        max_deliveries: int,
        max_items: int,
        lanes: tuple[str, ...] = IMAGE_LANES,
    ) -> list[Delivery]:
        with self._cv:
            now = time.monotonic()
            idle = [
                e
                for e in self._entries.values()
                if e.consumer is not None and e.delivery.lane in lanes and now - e.touched >= min_idle_s
            ]
            taken: list[Delivery] = []
            for entry in idle[:max_items]:
                entry.delivery.deliveries += 1
                self._reclaims += 1
                if entry.delivery.deliveries > max_deliveries:
                    reason = f"delivered {entry.delivery.deliveries - 1} times without a result (`max_deliveries`)"
                    self._dead.append((entry.delivery, reason))
                    self._finish(
                        entry.delivery,
                        ItemResult(
                            index=entry.delivery.work.index,
                            outcome="failed",
                            seed=entry.delivery.work.item.seed,
                            request=entry.delivery.work.request,
                            error=reason,
                        ),
                    )
                    continue
                self._retries += 1
                entry.consumer, entry.touched = consumer, now
                taken.append(entry.delivery)
            return taken

    def heartbeat(self, consumer: str, deliveries: list[Delivery], lanes: tuple[str, ...] = IMAGE_LANES) -> None:
        with self._cv:
            now = time.monotonic()
            if image_worker(lanes):
                self._workers[consumer] = now
            for d in deliveries:
                entry = self._entries.get(d.entry_id)
                if entry is not None and entry.consumer == consumer:
                    entry.touched = now

    def finish(self, done: list[tuple[Delivery, ItemResult]]) -> list[Written]:
        with self._cv:
            return [self._finish(d, r) for d, r in done]

    def _finish(self, delivery: Delivery, result: ItemResult) -> Written:
        if self._entries.pop(delivery.entry_id, None) is not None:
            self._lane_items[delivery.lane] -= 1
            owner = (delivery.work.owner, delivery.lane)
            self._owner_cost[owner] -= delivery.work.cost
            if self._owner_cost[owner] <= 0:
                del self._owner_cost[owner]
        job = self._jobs.get(delivery.work.job_id)
        if job is None or result.index in job.results:
            return Written(wrote=False)
        job.results[result.index] = result
        job.expires = time.time() + job.spec.ttl_s
        self._event(job, "item", result.index, result.outcome)
        if len(job.results) < len(job.spec.items):
            return Written(wrote=True)
        job.finished = time.time()
        self._event(job, "end")
        if job.spec.webhook is not None:
            st = job.status()
            counts = (st.total, st.done, st.failed, st.cancelled)
            due = WebhookDue(webhook_id(job.id), job.id, job.spec.owner, job.spec.webhook, job.spec.model, counts,
                             job.cancel_requested, job.created, job.finished)  # fmt: skip
            self._webhooks[due.id] = (job.finished, due)
        return Written(wrote=True, job_seconds=job.finished - job.created)

    def webhooks_due(self, now: float, lease_s: float, n: int) -> list[WebhookDue]:
        with self._cv:
            due = sorted((at, d.id) for at, d in self._webhooks.values() if at <= now)[:n]
            out = []
            for _, wid in due:
                record = self._webhooks[wid][1]
                self._webhooks[wid] = (now + lease_s, record)
                out.append(record)
            return out

    def webhook_retry(self, due: WebhookDue, at: float) -> None:
        with self._cv:
            if due.id in self._webhooks:
                held = self._webhooks[due.id][1]
                self._webhooks[due.id] = (at, dataclasses.replace(held, attempts=held.attempts + 1))

    def webhook_done(self, due: WebhookDue) -> None:
        with self._cv:
            self._webhooks.pop(due.id, None)

    def partial(self, job_id: str, index: int, partial: int, b64_png: str) -> None:
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.finished is not None or index in job.results:
                return
            event = JobEvent(str(next(self._events)), "partial", index, partial=partial, data=b64_png)
            job.events.append(event)
            self._cv.notify_all()

    def _event(self, job: _Job, kind: str, index: int | None = None, outcome: str | None = None) -> None:
        job.events.append(JobEvent(cursor=str(next(self._events)), kind=kind, index=index, outcome=outcome))  # type: ignore[arg-type]
        self._cv.notify_all()

    def cancelled(self, job_ids: set[str]) -> set[str]:
        with self._cv:
            now = time.time()
            return {
                j for j in job_ids if (job := self._jobs.get(j)) is None or job.cancel_requested or job.expires < now
            }

    def progress(self, job_id: str, percent: int) -> None:
        with self._cv:
            job = self._jobs.get(job_id)
            if job is not None and job.finished is None:
                job.progress = max(job.progress, min(100, max(0, percent)))

    def _purge(self, now: float) -> None:
        """Forget expired jobs and keys; runs at most once a second, under the lock."""
        if now - self._purged < 1.0:
            return
        self._purged = now
        for job_id in [j for j, job in self._jobs.items() if job.expires < now]:
            self._drop(job_id)
        for k in [k for k, v in self._idempotency.items() if v[2] < now]:
            del self._idempotency[k]

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        owner = (job.spec.owner, job.spec.lane)
        self._owner_jobs[owner] -= 1
        if self._owner_jobs[owner] <= 0:
            del self._owner_jobs[owner]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
