"""Request-level batching: gather items from many requests into one engine call.

One worker thread per engine takes up to `max_batch` waiting items, waiting at most
`max_wait_s` for company once the first item arrived, runs them as one batch and resolves
each item's future with its own outcome. Items are admitted oldest first. The number of
waiting items is bounded (`max_queue`): beyond it `submit` raises `Overloaded` at once, so
a burst gets a fast 429 instead of unbounded latency.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from fewstep.engines.base import Engine, ImageItem, Outcome
from fewstep.errors import Cancelled, GenerationFailed, Overloaded


class RequestBatcher:
    """Feeds one engine from a bounded FIFO of items."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[tuple[ImageItem, Future[Outcome]]] = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{engine.info.model}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, items: list[ImageItem]) -> list[Future[Outcome]]:
        """Enqueue all items or none; raises Overloaded when they do not fit."""
        futures: list[Future[Outcome]] = [Future() for _ in items]
        with self._cv:
            if self._stopped:
                raise Cancelled("the engine is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                raise Overloaded(
                    f"queue full: {len(self._queue)} items waiting, limit `max_queue` = {self.max_queue}",
                    retry_after=max(1.0, self.max_wait_s * 2),
                )
            self._queue.extend(zip(items, futures, strict=True))
            self._cv.notify()
        return futures

    def _take(self) -> list[tuple[ImageItem, Future[Outcome]]]:
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch: list[tuple[ImageItem, Future[Outcome]]] = []
            while self._queue and len(batch) < self.max_batch:
                item, fut = self._queue.popleft()
                if fut.set_running_or_notify_cancel():  # skip items whose caller went away
                    batch.append((item, fut))
            return batch

    def _loop(self) -> None:
        while not self._stopped:
            batch = self._take()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                outcomes = self.engine.run([item for item, _ in batch])
            except Exception as e:  # the engine broke its contract; fail this batch, keep serving
                outcomes = [GenerationFailed(f"engine error: {type(e).__name__}") for _ in batch]
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                fut.set_result(outcome)

    def close(self) -> None:
        """Stop the worker; items still waiting are resolved as Cancelled."""
        with self._cv:
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_result(Cancelled("the engine is shutting down"))
        self._thread.join(timeout=30)
