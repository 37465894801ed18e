"""Job events for many async waiters from one thread: the gateway's event hub.

Synchronous requests wait for their job's end and SSE streams for their job's next events. Each
used to hold a pool thread in a blocking queue read, so a few hundred open streams stalled the
gateway. The hub keeps one thread in `JobQueue.watch` over every watched job at once (one Redis
XREAD for all of them), and hands each waiter its events through its event loop; a waiter costs
a future, not a thread.

One read serves every waiter, so one waiter must never break it: a cursor is checked against the
queue's own rule before it joins (`JobQueue.valid_cursor`), and if the shared read fails anyway, each
job is read alone and only the waiters of a job whose own read fails get the error.

A waiter whose job the read in progress does not cover interrupts it, so that it is read at once. The
interrupt (a Redis write with Redis) is made by a thread of the hub's, never on the event loop, and
once per read however many waiters arrive meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fewstep.errors import NotReady, limit_error
from fewstep.service.queue.base import JobEvent, JobQueue

log = logging.getLogger("fewstep.service")


def sse(event: str, data: dict[str, Any], cursor: str | None = None) -> str:
    """One Server-Sent Event; `id` lets a client resume with `Last-Event-ID`."""
    head = f"id: {cursor}\n" if cursor else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def cursor_key(cursor: str) -> tuple[int, ...]:
    """Order of event cursors: the embedded queue's counters ("12") and Redis stream ids ("1700-3")."""
    return tuple(int(p) for p in (cursor or "0").split("-"))


@dataclass(eq=False)
class _Waiter:
    job_id: str
    cursor: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[JobEvent]] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    def deliver(self, events: list[JobEvent]) -> None:
        if not self.future.done():
            self.future.set_result(events)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class EventHub:
    """One watching thread per gateway; `next` is called from the event loop."""

    def __init__(self, queue: JobQueue, block_s: float = 1.0) -> None:
        self.queue = queue
        self.block_s = block_s
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._watching: dict[str, str] = {}
        """The cursors of the read in progress: a waiter they cover needs no interrupt."""
        self._wake_pending = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="event-hub", daemon=True)
        self._waker = threading.Thread(target=self._interrupts, name="event-hub-wake", daemon=True)
        self._thread.start()
        self._waker.start()

    async def next(
        self,
        job_id: str,
        cursor: str,
        timeout_s: float,
        gone: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> list[JobEvent]:
        """The job's events after `cursor`, as soon as there are any; [] after `timeout_s`, or as soon as
        `gone` (asked every `poll_s` while waiting: has the client left?) says so.

        `InvalidRequest` for a cursor this queue could not have sent; `NotReady` when this job's events
        cannot be read."""
        cursor = cursor or "0"
        if not self.queue.valid_cursor(cursor):
            raise limit_error("Last-Event-ID", "an event id this stream sent", cursor[:64])
        loop = asyncio.get_running_loop()
        waiter = _Waiter(job_id, cursor, loop)
        with self._lock:
            self._waiters.setdefault(job_id, []).append(waiter)
            watched = self._watching.get(job_id)
            if watched is None or cursor_key(cursor) < cursor_key(watched):
                self._wake_locked()
        deadline = loop.time() + timeout_s
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter.future), min(left, poll_s) if gone else left)
                except TimeoutError:
                    if gone is not None and await gone():
                        break
            return []
        finally:
            with self._lock:
                left_waiting = [w for w in self._waiters.get(job_id, []) if w is not waiter]
                if left_waiting:
                    self._waiters[job_id] = left_waiting
                else:
                    self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(map(len, self._waiters.values()))

    def _wake_locked(self) -> None:
        """Interrupt the read in progress, from the hub's waker thread (called with the lock held)."""
        if not self._wake_pending:
            self._wake_pending = True
            self._wake.set()

    def _interrupts(self) -> None:
        while True:
            self._wake.wait()
            if self._closed.is_set():
                return
            self._wake.clear()
            self.queue.interrupt()

    def _pump(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            with self._lock:
                cursors = {job: min((w.cursor for w in ws), key=cursor_key) for job, ws in self._waiters.items() if ws}
                self._watching = cursors
                self._wake_pending = False  # a waiter arriving from here on is either read, or wakes the read
            try:
                got = self.queue.watch(cursors, self.block_s)
                backoff = 0.1
            except NotReady as e:  # the queue is away: waiters time out and retry; say so once a while
                log.warning("event hub: %s", e)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # one job's read broke the shared one: read each alone, fail only its waiters
                log.exception("event hub: the shared read failed; reading each job alone")
                got = self._each_alone(cursors)
            self._hand_out(cursors, got)

    def _each_alone(self, cursors: dict[str, str]) -> dict[str, list[JobEvent]]:
        got: dict[str, list[JobEvent]] = {}
        for job_id, cursor in cursors.items():
            try:
                got.update(self.queue.watch({job_id: cursor}, 0.0))
            except Exception as e:
                log.warning("event hub: reading job %s's events failed: %s: %s", job_id, type(e).__name__, e)
                error = NotReady(f"this job's events cannot be read ({type(e).__name__})")
                with self._lock:
                    for w in self._waiters.pop(job_id, []):
                        w.loop.call_soon_threadsafe(w.fail, error)
        return got

    def _hand_out(self, cursors: dict[str, str], got: dict[str, list[JobEvent]]) -> None:
        with self._lock:
            for job_id, events in got.items():
                since = cursor_key(cursors[job_id])
                waiting: list[_Waiter] = []
                for w in self._waiters.get(job_id, []):
                    fresh = [e for e in events if cursor_key(e.cursor) > cursor_key(w.cursor)]
                    if cursor_key(w.cursor) < since or not fresh:
                        waiting.append(w)  # (one from further back came in after this read began)
                        continue
                    w.loop.call_soon_threadsafe(w.deliver, fresh)
                # A waiter that has its events leaves at once: watched on until its coroutine ran, it made
                # every following watch return the same events at once (a busy loop beside the engines).
                if waiting:
                    self._waiters[job_id] = waiting
                else:
                    self._waiters.pop(job_id, None)

    def close(self) -> None:
        self._closed.set()
        self.queue.interrupt()
        self._wake.set()
        self._thread.join(timeout=5)
        self._waker.join(timeout=5)
