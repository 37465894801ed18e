"""The engine worker: takes items from a `JobQueue`, runs them in batches, writes one result each.

The same loop runs as threads inside the gateway (embedded queue) and as `fewstep worker`
processes on the Redis queue, where many workers on many machines share one consumer group.

Each turn a worker first takes back items that a dead worker left idle (`reclaim`): such an
item may be the one that killed it, so it runs **alone** and cannot take healthy neighbours
down with it a second time; past `max_deliveries` the queue dead-letters it. Then it claims
up to `max_batch_size` new items, interactive lane first, and runs them, asking the queue at
every denoising step which jobs were cancelled. A heartbeat thread keeps its in-flight items
from being reclaimed while they run. A result that cannot be written (Redis away) is retried
until it is: work done is not thrown away.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image

from fewstep.engines.base import Engine, ImageResult, Outcome
from fewstep.errors import Cancelled, FewstepError, GenerationFailed, NotReady
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import Delivery, ItemResult, JobQueue
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.worker")
EngineLookup = Callable[[str], Engine]
"""model name → its loaded engine; raises NotFound (unknown model) or NotReady (not loaded here)."""


def encode_png(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 → base64 PNG, as the API returns it."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def engine_lookup(settings: Settings, loaded: EngineLookup | None) -> EngineLookup:
    """The engines workers run: the runtime's loaded models, or one no-op engine for every name."""
    if settings.engine == "image":
        assert loaded is not None, "the image engine needs a loaded runtime"
        return loaded
    from fewstep.engines.noop import NoopEngine

    noop = NoopEngine(step_s=settings.noop_step_ms / 1000.0)
    return lambda _model: noop


def worker_name() -> str:
    """Unique per process start: a restarted worker never inherits a dead one's entries by name."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """One claim → run → finish loop plus its heartbeat thread."""

    def __init__(
        self,
        queue: JobQueue,
        engine_for: EngineLookup,
        settings: Settings,
        metrics: Metrics | None = None,
        name: str | None = None,
    ) -> None:
        self.queue = queue
        self.engine_for = engine_for
        self.settings = settings
        self.metrics = metrics
        self.name = name or worker_name()
        self._flight: list[Delivery] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_warning = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop and the heartbeat in background threads."""
        for target, label in ((self._loop, "loop"), (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=f"worker-{label}-{self.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def run(self) -> None:
        """Run in the calling thread until `stop()` (the `fewstep worker` process)."""
        hb = threading.Thread(target=self._heartbeat, name=f"worker-heartbeat-{self.name}", daemon=True)
        hb.start()
        self._threads.append(hb)
        self._loop()

    def request_stop(self) -> None:
        """Ask the loop to end after the batch in hand (safe from a signal handler)."""
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, then stop claiming. Unfinished items are reclaimed by others."""
        self._stopping.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        s = self.settings
        next_reclaim = 0.0
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + s.claim_idle_s / 2
                    for d in self.queue.reclaim(self.name, s.claim_idle_s, s.max_deliveries, s.max_batch_size):
                        w = d.work
                        log.warning("retrying %s item %d (delivery %d), alone", w.job_id, w.index, d.deliveries)
                        self._process([d])
                batch = self.queue.claim(self.name, s.max_batch_size, 0.5, s.batch_wait_ms / 1000.0)
                if batch:
                    self._process(batch)
                backoff = 0.1
            except NotReady as e:
                self._warn(f"queue unavailable, retrying in {backoff:.1f} s: {e}")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug here must not end the worker: log it and go on
                log.exception("worker loop error")
                self._stopping.wait(1.0)

    def _process(self, deliveries: list[Delivery]) -> None:
        self._flight = list(deliveries)
        try:
            gone = self.queue.cancelled({d.work.job_id for d in deliveries})
            by_model: dict[str, list[Delivery]] = defaultdict(list)
            skipped = Cancelled("job cancelled before the item started")
            self._finish([(d, self._result(d, skipped, None)) for d in deliveries if d.work.job_id in gone])
            for d in deliveries:
                if d.work.job_id not in gone:
                    by_model[d.work.model].append(d)
            for model, group in by_model.items():
                self._run(model, group)
        finally:
            self._flight = []

    def _run(self, model: str, group: list[Delivery]) -> None:
        try:
            engine = self.engine_for(model)
        except NotReady as e:
            # Not loaded on this worker: leave the items unacknowledged so another worker takes them.
            self._warn(f"cannot serve {model!r} here ({e}); its items go back to the queue")
            return
        except FewstepError as e:
            self._finish([(d, self._result(d, e, None)) for d in group])
            return
        t0 = time.perf_counter()
        try:
            outcomes = engine.run([d.work.item for d in group], self._stop_check(group))
        except Exception as e:  # the engine broke its contract: fail this batch, keep serving
            log.exception("engine error on %s", model)
            outcomes = [GenerationFailed(f"engine error: {type(e).__name__}") for _ in group]
        if self.metrics is not None:
            self.metrics.batch_size.labels(model).observe(len(group))
            self.metrics.batch_seconds.labels(model).observe(time.perf_counter() - t0)
        version = engine.info.version
        self._finish([(d, self._result(d, o, version)) for d, o in zip(group, outcomes, strict=True)])

    def _stop_check(self, group: list[Delivery]) -> Callable[[int, list[int]], list[int]]:
        def stop(k: int, active: list[int]) -> list[int]:
            if k == 0:
                return []  # checked just before the batch started
            try:
                gone = self.queue.cancelled({group[i].work.job_id for i in active})
            except NotReady:
                return []
            return [i for i in active if group[i].work.job_id in gone]

        return stop

    @staticmethod
    def _result(d: Delivery, outcome: Outcome, version: str | None) -> ItemResult:
        w = d.work
        if isinstance(outcome, ImageResult):
            return ItemResult(
                index=w.index,
                outcome="ok",
                seed=outcome.seed,
                request=w.request,
                steps=outcome.steps,
                nfe=outcome.nfe,
                model_version=version,
                b64_json=encode_png(outcome.pixels),
            )
        return ItemResult(
            index=w.index,
            outcome="cancelled" if isinstance(outcome, Cancelled) else "failed",
            seed=w.item.seed,
            request=w.request,
            steps=w.item.steps,
            model_version=version,
            error=str(outcome),
        )

    def _finish(self, done: list[tuple[Delivery, ItemResult]]) -> None:
        """Write the results, retrying while the queue is away: the work is done and must not be lost."""
        if not done:
            return
        backoff = 0.1
        while True:
            try:
                written = self.queue.finish(done)
                break
            except NotReady as e:
                self._warn(f"cannot write {len(done)} results, retrying: {e}")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if self.metrics is not None:
            for (_, result), w in zip(done, written, strict=True):
                self.metrics.worker_items.labels(result.outcome if w.wrote else "duplicate").inc()
                if w.job_seconds is not None:
                    self.metrics.job_seconds.observe(w.job_seconds)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_s):
            try:
                self.queue.heartbeat(self.name, list(self._flight))
            except NotReady as e:
                self._warn(f"heartbeat failed: {e}")
            except Exception:
                log.exception("heartbeat error")

    def _warn(self, message: str) -> None:
        """At most one warning every 5 s: an outage should not flood the log."""
        now = time.monotonic()
        if now - self._last_warning >= 5.0:
            self._last_warning = now
            log.warning("%s: %s", self.name, message)
