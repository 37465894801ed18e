"""The Redis job queue: Redis Streams, one consumer group, at-least-once, results written once.

Layout (all names in `keys.py`): one stream per lane holds work items; every worker reads
them through one consumer group, so an item stays in the group's pending list until its
worker acknowledges it. Acknowledged entries are deleted (XACK does not delete). Writes that
must not interleave (submit with its idempotency key and depth check; a result with its
counters, events and acknowledgement) are Lua scripts, so they are atomic across any number
of gateways and workers.

Connection loss is `NotReady` to callers; redis-py reconnects on the next command, so
gateways and workers ride out a Redis restart without being restarted themselves.
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import redis

from fewstep.errors import NotFound, NotReady, Overloaded
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
)
from fewstep.service.queue.keys import (
    DEAD_LETTERS_MAX,
    IDEMPOTENCY_TTL_S,
    IMAGE_LANES,
    LANES,
    WORKER_TTL_S,
    Keys,
    image_worker,
)
from fewstep.service.queue.scripts import CANCEL, FEED, FINISH, PARTIAL, PROGRESS, SUBMIT, WEBHOOKS_DUE

P = ParamSpec("P")
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_MAX_ID_PART = 2**64 - 1
"""A Redis stream id is two unsigned 64-bit numbers; a larger one fails the whole XREAD it is in."""
R = TypeVar("R")


def _reachable(fn: Callable[P, R]) -> Callable[P, R]:
    """Connection trouble becomes NotReady (503 / worker back-off) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise NotReady(f"job queue unreachable: {type(e).__name__}", retry_after=2.0) from e
        except redis.exceptions.OutOfMemoryError as e:
            # Redis at `maxmemory` (noeviction) refuses writes: new work waits (503), finished work is
            # retried by its worker until the results fit, so nothing is dropped or run twice.
            raise NotReady("job queue full (Redis at maxmemory)", retry_after=5.0) from e

    return wrapper


def _event(entry_id: Any, fields: dict[Any, Any]) -> JobEvent:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return JobEvent(
        cursor=_s(entry_id),
        kind=f["kind"],  # type: ignore[arg-type]  # written only by our scripts
        index=int(f["index"]) if "index" in f else None,
        outcome=f.get("outcome"),
        partial=int(f["partial"]) if "partial" in f else None,
        data=f.get("data"),
    )


def owner_field(owner: str, lane: str) -> str:
    """Field of the owners' cost hash: one per (owner, lane)."""
    return f"{owner}|{lane}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisQueue:
    """`JobQueue` on Redis Streams. One instance per process; thread-safe (redis-py pools connections)."""

    in_process = False

    def __init__(self, url: str, max_depth: dict[str, int], prefix: str = "fewstep") -> None:
        self.keys = Keys(prefix)
        self.max_depth = max_depth
        # socket_timeout bounds every call; blocking reads ask for less than this.
        # redis-py's reply types are unions of every RESP shape; replies are parsed below instead.
        self.r: Any = redis.Redis.from_url(url, socket_timeout=15, socket_connect_timeout=5, health_check_interval=10)
        self._submit = self.r.register_script(SUBMIT)
        self._finish = self.r.register_script(FINISH)
        self._cancel = self.r.register_script(CANCEL)
        self._partial = self.r.register_script(PARTIAL)
        self._progress = self.r.register_script(PROGRESS)
        self._webhooks_due = self.r.register_script(WEBHOOKS_DUE)
        self._feed = self.r.register_script(FEED)
        self._groups_ready = False
        self._wake = f"{self.keys.prefix}:wake:{secrets.token_hex(6)}"
        """This process's wake stream: `interrupt` writes to it, `watch` reads it with the jobs' streams."""
        self._woken = "0-0"
        self._reclaim_from = dict.fromkeys(LANES, "0-0")
        """XAUTOCLAIM's cursor per lane: each call resumes the scan of the pending list where the last ended."""

    # -- gateway side ------------------------------------------------------------------------
    @_reachable
    def submit(self, spec: JobSpec) -> JobStatus:
        job_id = secrets.token_urlsafe(16)
        has_key = spec.idempotency_key is not None
        idem = self.keys.idempotency(spec.owner, key_digest(spec.idempotency_key or ""))
        payloads = [
            WorkItem(job_id, i, spec.model, it, spec.cost_of(i), spec.request_of(i), spec.owner).encode()
            for i, it in enumerate(spec.items)
        ]
        args: list[str | int | float] = [
            job_id,
            spec.fingerprint,
            self.max_depth[spec.lane],
            spec.ttl_s,
            IDEMPOTENCY_TTL_S,
        ]
        args += ["1" if has_key else "0", len(payloads), time.time(), spec.owner, spec.model, spec.lane]
        limit = -1 if spec.owner_limit is None else spec.owner_limit
        jobs = -1 if spec.owner_jobs is None else spec.owner_jobs
        args += [owner_field(spec.owner, spec.lane), spec.cost, limit, jobs, int(time.time() * 1000)]
        args += [self.keys.group, self.keys.backlog_prefix(spec.lane), spec.webhook or "", spec.meta, *payloads]
        keys = [self.keys.lane(spec.lane), self.keys.job(job_id), idem, self.keys.stats, self.keys.owner_cost]
        keys += [self.keys.owner_jobs(spec.owner, spec.lane), self.keys.backlog_prefix(spec.lane) + spec.owner]
        keys += [self.keys.ring(spec.lane), self.keys.waiting(spec.lane)]
        verdict, value = self._submit(keys=keys, args=args)
        verdict, value = _s(verdict), _s(value)
        if verdict == "full":
            raise Overloaded(
                f"queue full: {value} {spec.lane} items queued, {len(payloads)} more would pass the limit of "
                f"{self.max_depth[spec.lane]}",
                retry_after=2.0,
            )
        if verdict == "owner":
            raise owner_over_limit(spec, int(value))
        if verdict == "jobs":
            raise owner_over_jobs(spec, int(value))
        if verdict == "existing":
            known_id, _, known_fp = value.partition("|")
            if known_fp != spec.fingerprint:
                assert spec.idempotency_key is not None
                raise idempotency_conflict(spec.idempotency_key)
            try:
                return self.status(known_id, spec.owner)
            except NotFound:  # the job expired before its key: the key no longer holds
                self.r.delete(idem)
                return self.submit(spec)
        return self.status(job_id, spec.owner)

    def _hash(self, job_id: str, owner: str | None) -> dict[str, str]:
        h = self._hashes([job_id])[0] if valid_job_id(job_id) else {}
        if not h or (owner is not None and h.get("owner") != owner):
            raise NotFound(f"job {job_id!r} not found")
        return h

    def _hashes(self, job_ids: list[str]) -> list[dict[str, str]]:
        """The jobs' hashes ({} for a job that is gone), each with `expires` from its key's TTL."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
            pipe.pttl(self.keys.job(job_id))
        replies = pipe.execute()
        out = []
        for raw, pttl in zip(replies[::2], replies[1::2], strict=True):
            h = {_s(k): _s(v) for k, v in raw.items()}
            if h and int(pttl) > 0:
                h["expires"] = str(time.time() + int(pttl) / 1000)
            out.append(h)
        return out

    @staticmethod
    def _status(job_id: str, h: dict[str, str]) -> JobStatus:
        counts = (int(h["total"]), int(h["done"]), int(h["failed"]), int(h["cancelled"]))
        started, finished, expires = (float(h[k]) if k in h else None for k in ("started", "finished", "expires"))
        more = (expires, int(h.get("progress", 0)), h.get("meta", ""))
        times = (float(h["created"]), started, finished)
        return JobStatus.of(job_id, h["model"], counts, times, h.get("cancel") == "1", more)

    @_reachable
    def status(self, job_id: str, owner: str) -> JobStatus:
        return self._status(job_id, self._hash(job_id, owner))

    @_reachable
    def results(self, job_id: str, owner: str) -> list[ItemResult]:
        self._hash(job_id, owner)
        raw = self.r.hgetall(self.keys.results(job_id))
        out = [ItemResult.decode(v) for v in raw.values()]
        return sorted(out, key=lambda r: r.index)

    @_reachable
    def cancel(self, job_id: str, owner: str) -> JobStatus:
        self._hash(job_id, owner)
        self._cancel(keys=[self.keys.job(job_id), self.keys.events(job_id)], args=[time.time()])
        return self.status(job_id, owner)

    @_reachable
    def jobs(self, owner: str, lane: str) -> list[JobStatus]:
        ids = [_s(j) for j in self.r.zrangebyscore(self.keys.owner_jobs(owner, lane), time.time(), "+inf")]
        kept = [(j, h) for j, h in zip(ids, self._hashes(ids), strict=True) if h and h.get("owner") == owner]
        return sorted((self._status(j, h) for j, h in kept), key=lambda st: st.created)

    @_reachable
    def forget(self, job_id: str, owner: str) -> None:
        try:
            h = self._hash(job_id, owner)
        except NotFound:
            return
        self.r.delete(self.keys.job(job_id), self.keys.results(job_id), self.keys.events(job_id))
        self.r.zrem(self.keys.owner_jobs(owner, h.get("lane", "")), job_id)

    @_reachable
    def events(self, job_id: str, cursor: str, block_s: float) -> list[JobEvent]:
        block_ms = max(1, int(min(block_s, 10.0) * 1000))
        reply = self.r.xread({self.keys.events(job_id): cursor or "0"}, count=256, block=block_ms)
        return [_event(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    @_reachable
    def watch(self, cursors: dict[str, str], block_s: float) -> dict[str, list[JobEvent]]:
        streams = {self.keys.events(job_id): cursor or "0" for job_id, cursor in cursors.items()}
        streams[self._wake] = self._woken
        block_ms = max(1, int(min(block_s, 10.0) * 1000))
        reply = self.r.xread(streams, count=256, block=block_ms)
        out: dict[str, list[JobEvent]] = {}
        prefix, suffix = self.keys.events("\0").split("\0")
        for stream, entries in reply or []:
            name = _s(stream)
            if name == self._wake:
                self._woken = _s(entries[-1][0])
                continue
            out[name[len(prefix) : len(name) - len(suffix)]] = [_event(i, f) for i, f in entries]
        return out

    def interrupt(self) -> None:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):  # the watch times out by itself
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(self._wake, {"w": 1}, maxlen=8, approximate=False)
            pipe.expire(self._wake, 3600)
            pipe.execute()

    def valid_cursor(self, cursor: str) -> bool:
        m = _STREAM_ID.fullmatch(cursor)
        return m is not None and all(int(part) <= _MAX_ID_PART for part in m.groups() if part is not None)

    @_reachable
    def stats(self) -> QueueStats:
        now = time.time()
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        for lane in LANES:
            pipe.xlen(k.lane(lane))
            pipe.xrange(k.lane(lane), count=1)
            pipe.lrange(k.ring(lane), 0, -1)
            pipe.llen(k.waiting(lane))
        pipe.xlen(k.dead)
        pipe.hgetall(k.stats)
        pipe.zcount(k.workers, now - WORKER_TTL_S, "+inf")
        replies = pipe.execute()
        counters = {_s(key): int(v) for key, v in replies[-2].items()}
        depth: dict[str, int] = {}
        queued_ms: list[int] = []  # when each lane's oldest entry and each backlog's head were queued
        heads = self.r.pipeline(transaction=False)
        for i, lane in enumerate(LANES):
            depth[lane] = int(replies[4 * i]) + int(replies[4 * i + 3])
            if head := replies[4 * i + 1]:
                entry_id, fields = head[0]
                queued_ms.append(int(_s(fields.get(b"at") or _s(entry_id).split("-")[0])))
            for owner in replies[4 * i + 2]:
                heads.lindex(k.backlog_prefix(lane) + _s(owner), 0)
        queued_ms += [int(_s(h).split("|", 3)[2]) for h in heads.execute() if h]
        in_flight = 0
        for lane in LANES:
            with contextlib.suppress(redis.ResponseError):  # no group yet: no worker ever started
                in_flight += int(self.r.xpending(k.lane(lane), k.group)["pending"])
        return QueueStats(
            depth=depth,
            in_flight=in_flight,
            oldest_age_s=max(0.0, now - min(queued_ms) / 1000.0) if queued_ms else 0.0,
            dead=int(replies[-3]),
            reclaims=counters.get("reclaims", 0),
            retries=counters.get("retries", 0),
            workers=int(replies[-1]),
        )

    @_reachable
    def ping(self) -> None:
        self.r.ping()

    @_reachable
    def dead_letters(self) -> list[dict[str, str]]:
        return [{_s(k): _s(v) for k, v in f.items()} for _, f in self.r.xrange(self.keys.dead)]

    # -- worker side -------------------------------------------------------------------------
    def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for lane in LANES:
            try:
                self.r.xgroup_create(self.keys.lane(lane), self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ready = True

    def _read(self, consumer: str, streams: dict[str, str], count: int, block_ms: int | None) -> list[Delivery]:
        try:
            reply = self.r.xreadgroup(self.keys.group, consumer, streams, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._groups_ready = False  # Redis lost its data (no AOF): make the group again
            self._ensure_groups()
            return []
        out: list[Delivery] = []
        for stream, entries in reply or []:
            lane = _s(stream).rsplit(":", 1)[-1]
            for entry_id, fields in entries:
                out.append(self._delivery(lane, entry_id, fields, 1))
        return out

    @staticmethod
    def _delivery(lane: str, entry_id: Any, fields: dict, deliveries: int) -> Delivery:
        f = {_s(k): _s(v) for k, v in fields.items()}
        return Delivery(
            entry_id=_s(entry_id),
            lane=lane,
            work=WorkItem.decode(f["job"], int(f["index"]), f["item"]),
            deliveries=deliveries,
            queued_at=int(f.get("at") or _s(entry_id).split("-")[0]) / 1000.0,  # ms of submit (or of XADD)
        )

    @_reachable
    def claim(
        self, consumer: str, max_items: int, block_s: float, gather_s: float, lanes: tuple[str, ...] = IMAGE_LANES
    ) -> list[Delivery]:
        self._ensure_groups()
        if image_worker(lanes):
            self._alive(consumer)
        taken = self._fill(consumer, [], max_items, lanes)
        if not taken and block_s > 0:
            streams = {self.keys.lane(lane): ">" for lane in lanes}
            taken = self._read(consumer, streams, 1, max(1, int(min(block_s, 10.0) * 1000)))
            if taken and gather_s > 0 and len(taken) < max_items:
                time.sleep(gather_s)
            taken = self._fill(consumer, taken, max_items, lanes)
        started = {d.work.job_id for d in taken}
        if started:
            pipe = self.r.pipeline(transaction=False)
            for job_id in started:
                pipe.hsetnx(self.keys.job(job_id), "started", time.time())
            pipe.execute()
        return taken

    def _fill(self, consumer: str, taken: list[Delivery], max_items: int, lanes: tuple[str, ...]) -> list[Delivery]:
        """Top up a batch without blocking, from `lanes` in order (interactive first), each fed fairly first."""
        for lane in lanes:
            room = max_items - len(taken)
            if room <= 0:
                break
            k = self.keys
            self._feed(keys=[k.lane(lane), k.ring(lane), k.waiting(lane)], args=[k.group, k.backlog_prefix(lane), room])
            taken += self._read(consumer, {k.lane(lane): ">"}, room, None)
        return taken

    @_reachable
    def reclaim(
        self,
        consumer: str,
        min_idle_s: float,
        max_deliveries: int,
        max_items: int,
        lanes: tuple[str, ...] = IMAGE_LANES,
    ) -> list[Delivery]:
        self._ensure_groups()
        taken: list[Delivery] = []
        for lane in lanes:
            stream = self.keys.lane(lane)
            start = self._reclaim_from[lane]
            reply = self.r.xautoclaim(stream, self.keys.group, consumer, int(min_idle_s * 1000), start, count=max_items)
            cursor = reply[0]
            self._reclaim_from[lane] = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            claimed = [(i, f) for i, f in reply[1] if f]
            if not claimed:
                continue
            pipe = self.r.pipeline(transaction=False)
            for entry_id, _ in claimed:
                pipe.xpending_range(stream, self.keys.group, min=entry_id, max=entry_id, count=1)
            counts = [int(p[0]["times_delivered"]) if p else 1 for p in pipe.execute()]
            self.r.hincrby(self.keys.stats, "reclaims", len(claimed))
            for (entry_id, fields), times in zip(claimed, counts, strict=True):
                d = self._delivery(lane, entry_id, fields, times)
                if times > max_deliveries:
                    self._dead_letter(d, f"delivered {times - 1} times without a result (`max_deliveries`)")
                else:
                    self.r.hincrby(self.keys.stats, "retries", 1)
                    taken.append(d)
        return taken

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        """DLQ first, then the failed result and the ack: a crash in between duplicates, never loses."""
        self.r.xadd(
            self.keys.dead,
            {
                "job": d.work.job_id,
                "index": d.work.index,
                "item": d.work.encode(),
                "deliveries": d.deliveries - 1,
                "reason": reason,
                "at": time.time(),
            },
            maxlen=DEAD_LETTERS_MAX,
            approximate=False,  # exact: dead letters are rare, and the bound is then what it says
        )
        self.r.hincrby(self.keys.stats, "dead", 1)
        failed = ItemResult(
            index=d.work.index, outcome="failed", seed=d.work.item.seed, request=d.work.request, error=reason
        )
        self.finish([(d, failed)])

    def _alive(self, consumer: str) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {consumer: now})
        pipe.zremrangebyscore(self.keys.workers, "-inf", now - 10 * WORKER_TTL_S)
        pipe.execute()

    @_reachable
    def heartbeat(self, consumer: str, deliveries: list[Delivery], lanes: tuple[str, ...] = IMAGE_LANES) -> None:
        if image_worker(lanes):
            self._alive(consumer)
        for lane in LANES:
            ids = [d.entry_id for d in deliveries if d.lane == lane]
            if not ids:
                continue
            stream = self.keys.lane(lane)
            # Only entries still ours: one taken over by another worker stays with it.
            mine = self.r.xpending_range(stream, self.keys.group, min="-", max="+", count=10_000, consumername=consumer)
            still = sorted({_s(p["message_id"]) for p in mine} & set(ids))
            if still:
                self.r.xclaim(stream, self.keys.group, consumer, 0, still, justid=True)

    @_reachable
    def finish(self, done: list[tuple[Delivery, ItemResult]]) -> list[Written]:
        k = self.keys
        pipe = self.r.pipeline(transaction=False)  # one round trip for the batch; each script is atomic
        for delivery, result in done:
            job_id = delivery.work.job_id
            w = delivery.work
            args: list[str | int | float] = [result.index, result.encode(), result.outcome, time.time()]
            args += [delivery.entry_id, k.group, owner_field(w.owner, delivery.lane), w.cost, job_id]
            keys = [k.job(job_id), k.results(job_id), k.events(job_id), k.lane(delivery.lane), k.owner_cost]
            self._finish(keys=[*keys, k.webhooks, k.webhook_records], args=args, client=pipe)
        out = []
        for reply in pipe.execute():
            if isinstance(reply, bytes | str):  # this result completed the job; the reply is its creation time
                out.append(Written(wrote=True, job_seconds=time.time() - float(_s(reply))))
            else:
                out.append(Written(wrote=bool(reply)))
        return out

    @_reachable
    def partial(self, job_id: str, index: int, partial: int, b64_png: str) -> None:
        keys = [self.keys.job(job_id), self.keys.results(job_id), self.keys.events(job_id)]
        self._partial(keys=keys, args=[index, partial, b64_png])

    @_reachable
    def progress(self, job_id: str, percent: int) -> None:
        self._progress(keys=[self.keys.job(job_id)], args=[min(100, max(0, percent))])

    @_reachable
    def webhooks_due(self, now: float, lease_s: float, n: int) -> list[WebhookDue]:
        reply = self._webhooks_due(keys=[self.keys.webhooks, self.keys.webhook_records], args=[now, now + lease_s, n])
        out = []
        for i in range(0, len(reply), 3):
            wid, record, attempts = _s(reply[i]), _s(reply[i + 1]), int(_s(reply[i + 2]))
            if not record:  # a record lost (an operator's cleanup): nothing to send, never retried
                self.r.zrem(self.keys.webhooks, wid)
                continue
            out.append(WebhookDue.decode(record, attempts))
        return out

    @_reachable
    def webhook_retry(self, due: WebhookDue, at: float) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(self.keys.webhook_records, f"{due.id}:attempts", 1)
        pipe.zadd(self.keys.webhooks, {due.id: at}, xx=True)
        pipe.execute()

    @_reachable
    def webhook_done(self, due: WebhookDue) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.keys.webhooks, due.id)
        pipe.hdel(self.keys.webhook_records, due.id, f"{due.id}:attempts")
        pipe.execute()

    @_reachable
    def cancelled(self, job_ids: set[str]) -> set[str]:
        ordered = sorted(job_ids)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ordered:
            pipe.hget(self.keys.job(job_id), "cancel")
        return {j for j, flag in zip(ordered, pipe.execute(), strict=True) if flag is None or _s(flag) == "1"}

    def close(self) -> None:
        self.r.close()
