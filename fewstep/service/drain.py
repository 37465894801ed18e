"""Graceful shutdown of a gateway: what is in flight finishes, nothing new starts.

On SIGTERM (or Ctrl-C) `fewstep serve` calls `Drain.start`. From then on `/readyz` answers 503, new
work (image requests, jobs, event streams, video sessions) gets 503 with Retry-After, and every
response says `Connection: close`, while the listener stays open so that load balancers and
clients are told rather than reset. Synchronous requests in flight run to their end, event streams
end with a `shutdown` event (clients resume elsewhere with `Last-Event-ID`), video sessions close
with 1001 after the frame in progress. Once nothing is in flight, or after `drain_s`, the server
stops listening and exits 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Drain:
    """Counts work in flight and says whether the process is draining. Thread-safe."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self.draining = threading.Event()

    def start(self) -> None:
        """Stop taking new work (idempotent)."""
        with self._cv:
            self.draining.set()
            self._cv.notify_all()

    @property
    def active(self) -> int:
        with self._cv:
            return self._active

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed request, stream or session as in flight."""
        with self._cv:
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is in flight (True) or `timeout_s` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True
