"""The engine worker: takes items from a `JobQueue`, runs them in batches, writes one result each.

The same loop runs as threads inside the gateway (embedded queue) and as `fewstep worker`
processes on the Redis queue, where many workers on many machines share one consumer group.

The worker is the queue side of a `StepScheduler` (engines/scheduler.py): at every step
boundary the scheduler asks it for items to fill free slots (`take`), which running items
were cancelled (`dropped`), and hands it the outcomes of finished items (`done`). With the
default `FEWSTEP_BATCHING=step`, items join and leave the running batch at step boundaries.

Before claiming new items a worker takes back items that a dead worker left idle
(`reclaim`): such an item may be the one that killed it, so it runs **alone** and cannot take
healthy neighbours down with it a second time; past `max_deliveries` the queue dead-letters
it. A heartbeat thread keeps the running batch's items from being reclaimed. A result that
cannot be written (Redis away) is retried until it is: work done is not thrown away.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np

from fewstep.engines.base import ImageResult, Outcome, StepEngine, run_to_completion
from fewstep.engines.pixels import encode_png
from fewstep.engines.scheduler import Admission, Observer, StepScheduler
from fewstep.errors import Cancelled, FewstepError, GenerationFailed, NotReady
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import Delivery, ItemResult, JobQueue
from fewstep.service.queue.keys import BATCH, IMAGE_LANES, INTERACTIVE
from fewstep.service.settings import Settings

if TYPE_CHECKING:
    from fewstep.service.catalog import Catalog

log = logging.getLogger("fewstep.worker")
EngineLookup = Callable[[str], StepEngine]
"""model name → its loaded engine; raises NotFound (unknown model) or NotReady (not loaded here)."""
Router = Callable[[str, str], StepEngine]
"""(model, job id) → the engine a new item starts on: every item of one job gets the same version."""
Retired = Callable[[str, object, Outcome], None]
"""(model, engine, outcome) of every item the scheduler retires."""


def canary_outcome(outcome: Outcome) -> bool | None:
    """What a finished item says of the engine that ran it: failed (False), made (True), nothing (None:
    cancelled, or refused as invalid)."""
    if isinstance(outcome, GenerationFailed):
        return False
    return None if isinstance(outcome, FewstepError) else True


def observer(metrics: Metrics | None, finished: Retired | None = None) -> Observer:
    """Scheduler hooks → Prometheus (occupancy and time of each step, wait before the first step),
    and `finished` (each item's outcome and engine: a canary's live error rate)."""
    if metrics is None:
        return Observer(finished=finished)

    def step(model: str, occupancy: int, seconds: float) -> None:
        metrics.batch_size.labels(model).observe(occupancy)
        metrics.batch_seconds.labels(model).observe(seconds)

    def waited(model: str, seconds: float) -> None:
        metrics.first_step_wait.labels(model).observe(seconds)

    return Observer(step=step, waited=waited, finished=finished)


def _job_of(a: Admission) -> str:
    return a.ticket.work.job_id if isinstance(a.ticket, Delivery) else ""


class Cores:
    """How the engine threads of one process share its cores, decided at step boundaries.

    Interactive-only workers exist so that a synchronous request never waits for a batch job's step; they take
    items only while a general worker runs batch-lane items. Otherwise the general workers serve the
    interactive lane themselves, in one running batch, not split in two halves on half the cores each. While
    the interactive lane is all that runs, the general workers' torch teams have all the cores (`full`
    intra-op threads each); while batch items run (or an interactive-only worker does), every engine thread
    has an even share (`shared`): the interactive-only workers' share is kept for synchronous requests, and the
    teams together never oversubscribe the cores (libgomp throttles its spin-waits then: 1.5–2.4× slower
    here). docs/decisions/interactive-isolation.md has the measurements behind this."""

    def __init__(self, full: int, shared: int, set_threads: Callable[[int], None] | None) -> None:
        """`set_threads(n)`: sets the calling thread's intra-op threads (torch's); None: nothing to share (the
        no-op engine)."""
        self.full, self.shared, self.set_threads = full, shared, set_threads
        self._cv = threading.Condition()
        self._batch: set[int] = set()
        """General workers running batch-lane items."""
        self._interactive: set[int] = set()
        """Interactive-only workers running items."""

    def report(self, worker: Worker, lanes: set[str]) -> None:
        """What `worker` runs now: the lanes of its running items."""
        key = id(worker)
        with self._cv:
            held = self._interactive if worker.interactive_only else self._batch
            running = bool(lanes) if worker.interactive_only else BATCH in lanes
            if running != (key in held):
                (held.add if running else held.discard)(key)
                self._cv.notify_all()

    def interactive_may_take(self, wait_s: float) -> bool:
        """Whether an interactive-only worker may take items: a general worker runs batch items (waits up to
        `wait_s` for one to)."""
        with self._cv:
            return self._cv.wait_for(lambda: bool(self._batch), timeout=wait_s)

    def threads(self, worker: Worker) -> int:
        """The intra-op threads `worker`'s next step may use."""
        with self._cv:
            return self.shared if worker.interactive_only or self._interactive or self._batch else self.full


def build_workers(
    queue: JobQueue,
    engine_for: EngineLookup,
    settings: Settings,
    metrics: Metrics | None,
    name: str,
    general: int,
    route: Router | None,
    maintain: Callable[[], None] | None,
    finished: Retired | None,
    set_threads: Callable[[int], None] | None,
) -> list[Worker]:
    """A process's workers: `general` ones (the first named `name`, and following the registry with
    `maintain` between its steps: run it in the calling thread) and the `interactive_workers` that take only
    the interactive lane, all sharing the process's cores (`Cores`) and its consumer name `name` (the queue
    counts processes; each thread's heartbeat refreshes its own items)."""
    cores = Cores(
        settings.intra_op_threads(general), settings.intra_op_threads(settings.engine_threads(general)), set_threads
    )
    workers = [
        Worker(
            queue,
            engine_for,
            settings,
            metrics,
            name=None if i else name,
            route=route,
            maintain=None if i else maintain,
            finished=finished,
            cores=cores,
        )
        for i in range(general)
    ]
    workers += [
        Worker(
            queue,
            engine_for,
            settings,
            metrics,
            name=name,
            route=route,
            finished=finished,
            lanes=(INTERACTIVE,),
            cores=cores,
        )
        for _ in range(settings.interactive_workers if general else 0)
    ]
    return workers


def process_workers(
    queue: JobQueue,
    settings: Settings,
    metrics: Metrics | None,
    name: str,
    general: int,
    models: Catalog | None,
) -> list[Worker]:
    """The workers of one process, wired the same way in the gateway (embedded queue) and in `fewstep worker`.

    `models` as `Versions` runs the engines: new items start on the serving version or its canary, each
    finished item counts against the canary, and the registry is followed between the first worker's steps,
    with every worker's running engines kept open. Otherwise the no-op engine answers for every model
    (`FEWSTEP_ENGINE=noop`), and a routing catalog, if any, is followed between those steps."""
    from fewstep.service.catalog import Routing
    from fewstep.service.versions import Versions

    if not isinstance(models, Versions):
        from fewstep.engines.noop import NoopEngine

        noop = NoopEngine(step_s=settings.noop_step_ms / 1000.0)
        follow = models.maintain if isinstance(models, Routing) else None
        return build_workers(queue, lambda _m: noop, settings, metrics, name, general, None, follow, None, None)
    from fewstep.engines.backends.torch import set_intra_op_threads

    workers: list[Worker] = []
    serving: Versions[StepEngine] = models

    def maintain() -> None:
        serving.maintain([e for w in workers for e in w.scheduler.engines])

    def finished(model: str, engine: object, outcome: Outcome) -> None:
        serving.record(model, engine, canary_outcome(outcome))

    workers += build_workers(
        queue,
        serving.engine,
        settings,
        metrics,
        name,
        general,
        serving.engine,
        maintain,
        finished,
        set_intra_op_threads,
    )
    return workers


def worker_name() -> str:
    """Unique per process start: a restarted worker never inherits a dead one's entries by name."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """The queue side of one `StepScheduler` (claim, check cancellations, finish), plus its heartbeat thread."""

    def __init__(
        self,
        queue: JobQueue,
        engine_for: EngineLookup,
        settings: Settings,
        metrics: Metrics | None = None,
        name: str | None = None,
        route: Router | None = None,
        maintain: Callable[[], None] | None = None,
        finished: Retired | None = None,
        lanes: tuple[str, ...] = IMAGE_LANES,
        cores: Cores | None = None,
    ) -> None:
        """`engine_for`: the serving engine of a model; `route`: the engine a job's new item starts on
        (the serving one or a canary; default `engine_for`); `maintain`: called between step
        boundaries, in this worker's thread (the version lifecycle follows the registry there);
        `finished`: told each retired item's engine and outcome; `lanes`: the lanes it takes items
        from, in order (an interactive-only worker is capacity a batch job cannot fill)."""
        self.queue = queue
        self.lanes = lanes
        self.engine_for = engine_for
        self.settings = settings
        self.metrics = metrics
        self.name = name or worker_name()
        self.maintain = maintain
        self.cores = cores
        self._team = 0
        """The intra-op threads this thread last took (`Cores.threads`)."""
        self._flight: list[Delivery] = []
        self._next_reclaim = 0.0
        self.scheduler = StepScheduler(
            engine_for,
            settings.max_batch_size,
            settings.batch_wait_ms / 1000.0,
            settings.batching,
            observer(metrics, finished),
            join_wait=settings.join_wait,
            route=None if route is None else lambda a: route(a.model, _job_of(a)),
        )
        self._stopping = threading.Event()
        self._drained = threading.Event()
        """Set once the loop has finished its running batch: the heartbeat runs until then, so that a drain
        longer than `claim_idle_s` never has its items taken back and run twice."""
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
        self._threads += [hb, threading.current_thread()]  # so that `stop` from elsewhere waits for the loop
        self._loop()

    def request_stop(self) -> None:
        """Ask the loop to stop admitting and end once the running batch is done (safe from a signal handler)."""
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop admitting, finish the running batch (up to 60 s), and wait; anything left is reclaimed by others."""
        self._stopping.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- the loop --------------------------------------------------------------------------
    @property
    def interactive_only(self) -> bool:
        return self.lanes == (INTERACTIVE,)

    def _share_cores(self) -> None:
        """Tell the others what runs here; take this thread's share of the cores for the next step."""
        if self.cores is None:
            return
        self.cores.report(self, {d.lane for d in self._flight})
        team = self.cores.threads(self)
        if team != self._team and self.cores.set_threads is not None:
            self.cores.set_threads(team)
            self._team = team

    def _loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._share_cores()
                self.scheduler.tick(self, idle_wait_s=0.5)
                self._flight = [t for t in self.scheduler.tickets if isinstance(t, Delivery)]
                if self.maintain is not None:
                    self.maintain()
                backoff = 0.1
            except NotReady as e:
                self._warn(f"queue unavailable, retrying in {backoff:.1f} s: {e}")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug here must not end the worker: log it and go on
                log.exception("worker loop error")
                self._stopping.wait(1.0)
        deadline = time.monotonic() + 60.0
        while self.scheduler.running and time.monotonic() < deadline:  # stopping: finish what runs, admit nothing
            try:
                self.scheduler.tick(self, idle_wait_s=0.0, admit=False)
                self._flight = [t for t in self.scheduler.tickets if isinstance(t, Delivery)]
            except Exception:  # what is left unfinished is reclaimed by other workers
                log.exception("worker drain error")
                time.sleep(0.5)
        self._flight = []
        self._drained.set()

    # -- WorkSource: what the scheduler asks of the queue ----------------------------------
    def take(self, n: int, wait_s: float, gather_s: float) -> list[Admission]:
        """Items to start: reclaimed ones are run alone first, then new ones are claimed."""
        s = self.settings
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + s.claim_idle_s / 2
            for d in self.queue.reclaim(self.name, s.claim_idle_s, s.max_deliveries, s.max_batch_size, self.lanes):
                w = d.work
                log.warning("retrying %s item %d (delivery %d), alone", w.job_id, w.index, d.deliveries)
                self._run_alone(d)
        if self.interactive_only and self.cores is not None and not self.cores.interactive_may_take(wait_s):
            return []  # no batch step to stand beside: the general workers serve the interactive lane
        deliveries = self.queue.claim(self.name, n, wait_s, gather_s, self.lanes)
        if not deliveries:
            return []
        gone = self.queue.cancelled({d.work.job_id for d in deliveries})
        skipped = Cancelled("job cancelled before the item started")
        self._finish([(d, self._result(d, skipped)) for d in deliveries if d.work.job_id in gone])
        admitted: list[Admission] = []
        unknown: list[tuple[Delivery, ItemResult]] = []
        for d in deliveries:
            if d.work.job_id in gone:
                continue
            try:
                image = d.work.image
                self.engine_for(d.work.model)
            except NotReady as e:
                # Not loaded on this worker: leave it unacknowledged so that another worker takes it.
                self._warn(f"cannot serve {d.work.model!r} here ({e}); its items go back to the queue")
                continue
            except FewstepError as e:
                unknown.append((d, self._result(d, e)))
                continue
            admitted.append(Admission(d, d.work.model, image, d.queued_at))
        self._finish(unknown)
        # Heartbeated from now on, not from the end of the step they are about to take: a step longer than
        # `claim_idle_s` would otherwise let another worker take them back mid-step.
        self._flight = [*self._flight, *(a.ticket for a in admitted if isinstance(a.ticket, Delivery))]
        self._share_cores()  # before the step they are about to take: batch items now run here
        return admitted

    def dropped(self, tickets: list[Hashable]) -> set[Hashable]:
        jobs = {t.work.job_id for t in tickets if isinstance(t, Delivery)}
        try:
            gone = self.queue.cancelled(jobs) if jobs else set()
        except NotReady:
            return set()  # keep running; the next boundary asks again
        return {t for t in tickets if isinstance(t, Delivery) and t.work.job_id in gone}

    def progress(self, partials: list[tuple[Admission, int, np.ndarray]]) -> None:
        for a, k, pixels in partials:
            assert isinstance(a.ticket, Delivery)
            w = a.ticket.work
            try:
                self.queue.partial(w.job_id, w.index, k, encode_png(pixels))
            except NotReady as e:  # a partial is a courtesy: the item's result is what must not be lost
                log.warning("partial image %d of %s item %d not sent: %s", k, w.job_id, w.index, e)

    def done(self, results: list[tuple[Admission, Outcome]]) -> None:
        out = []
        for a, outcome in results:
            assert isinstance(a.ticket, Delivery)
            out.append((a.ticket, self._result(a.ticket, outcome)))
        self._finish(out)

    def _run_alone(self, d: Delivery) -> None:
        """A reclaimed item may be the one that killed its last worker: it gets a batch of its own."""
        self._flight = [*self._flight, d]
        try:
            engine = self.engine_for(d.work.model)
            outcome = run_to_completion(engine, [d.work.image], self._stop_check(d))[0]
        except NotReady:
            return
        except FewstepError as e:
            outcome = e
        except Exception as e:
            log.exception("engine error on %s", d.work.model)
            outcome = GenerationFailed(f"engine error: {type(e).__name__}")
        finally:
            self._flight = [x for x in self._flight if x is not d]
        self._finish([(d, self._result(d, outcome))])

    def _stop_check(self, d: Delivery) -> Callable[[int, list[int]], list[int]]:
        def stop(k: int, active: list[int]) -> list[int]:
            return list(active) if k > 0 and self.dropped([d]) else []

        return stop

    @staticmethod
    def _result(d: Delivery, outcome: Outcome) -> ItemResult:
        w = d.work
        if isinstance(outcome, ImageResult):
            return ItemResult(
                index=w.index,
                outcome="ok",
                seed=outcome.seed,
                request=w.request,
                steps=outcome.steps,
                nfe=outcome.nfe,
                model_version=outcome.version,
                b64_json=encode_png(outcome.pixels),
            )
        return ItemResult(
            index=w.index,
            outcome="cancelled" if isinstance(outcome, Cancelled) else "failed",
            seed=w.item.seed,
            request=w.request,
            steps=w.item.steps,
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
        while not self._drained.wait(self.settings.heartbeat_s):
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
