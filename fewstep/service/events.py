"""Job events for many async waiters from one thread: the gateway's event hub.

Synchronous requests wait for their job's end and SSE streams for their job's next events. Each
used to hold a pool thread in a blocking queue read, so a few hundred open streams stalled the
gateway. The hub keeps one thread in `JobQueue.watch` over every watched job at once (one Redis
XREAD for all of them), and hands each waiter its events through its event loop; a waiter costs
a future, not a thread. A new waiter interrupts the watch in progress so that it is read at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from fewstep.errors import NotReady
from fewstep.service.queue.base import JobEvent, JobQueue

log = logging.getLogger("fewstep.service")


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


class EventHub:
    """One watching thread per gateway; `next` is called from the event loop."""

    def __init__(self, queue: JobQueue, block_s: float = 1.0) -> None:
        self.queue = queue
        self.block_s = block_s
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="event-hub", daemon=True)
        self._thread.start()

    async def next(self, job_id: str, cursor: str, timeout_s: float) -> list[JobEvent]:
        """The job's events after `cursor`, as soon as there are any; [] after `timeout_s`."""
        waiter = _Waiter(job_id, cursor or "0", asyncio.get_running_loop())
        with self._lock:
            self._waiters.setdefault(job_id, []).append(waiter)
        self.queue.interrupt()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except TimeoutError:
            return []
        finally:
            with self._lock:
                left = [w for w in self._waiters.get(job_id, []) if w is not waiter]
                if left:
                    self._waiters[job_id] = left
                else:
                    self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(map(len, self._waiters.values()))

    def _pump(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            with self._lock:
                cursors = {job: min((w.cursor for w in ws), key=cursor_key) for job, ws in self._waiters.items() if ws}
            try:
                got = self.queue.watch(cursors, self.block_s)
                backoff = 0.1
            except NotReady as e:  # the queue is away: waiters time out and retry; say so once a while
                log.warning("event hub: %s", e)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # a bug here must not stop every waiter for good
                log.exception("event hub error")
                self._closed.wait(1.0)
                continue
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
        self._thread.join(timeout=5)
