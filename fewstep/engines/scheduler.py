"""Step-level continuous batching: items join and leave a running batch at step boundaries.

A few-step student makes the denoising step the natural unit of work, as the token is for an
LLM server. The scheduler keeps a running batch of slots, each at its own step of its own
schedule (1–4 NFE, hybrid or not). Every `tick` is one step boundary:

1. **drop**: slots the source says are cancelled leave now, before spending another step;
2. **admit**: fill free slots from the source, oldest first, up to `max_batch`. With nothing
   running it waits for work, then up to `max_wait_s` for company. With a batch running it
   waits at most `join_wait` × the last step's time, and only when items just left (their
   clients may be sending the next request); then newcomers join at this boundary;
3. **advance**: one network evaluation per engine for all its running slots (a slot stays
   with the engine that began it, so a newly loaded model version never finishes an old
   version's trajectory);
4. **retire**: finished slots leave and their outcomes go back to the source.

Policies (`FEWSTEP_BATCHING`), the same loop with another admission rule, so that the
benchmark compares them like for like:

* `step` (default): admit at every boundary (continuous batching);
* `request`: admit only when nothing runs; a batch forms, its items leave as they finish and
  nobody joins until it is empty (classic request-level batching);
* `none`: one item at a time.

Fairness: admission is oldest first in the source's order (FIFO per lane; the interactive
lane before the batch lane), and a running slot is never preempted: it finishes within its
own 1–4 steps. So under full load a waiting item is admitted within one longest schedule
(4 steps) of reaching the head of its lane, and nothing waits forever behind newer work.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from fewstep.engines.base import ImageItem, Outcome, Slot, StepEngine, cancelled
from fewstep.errors import Cancelled, FewstepError, GenerationFailed, Overloaded

Policy = Literal["step", "request", "none"]
POLICIES: tuple[Policy, ...] = ("step", "request", "none")


@dataclass(frozen=True)
class Admission:
    """A unit of work handed to the scheduler. `queued_at` (wall clock) dates its wait."""

    ticket: Hashable
    model: str
    item: ImageItem
    queued_at: float


class WorkSource(Protocol):
    """Where the scheduler's work comes from and where its outcomes go."""

    def take(self, n: int, wait_s: float, gather_s: float) -> list[Admission]:
        """Up to `n` new items, oldest first; waits up to `wait_s` for one, then `gather_s` for more."""

    def dropped(self, tickets: list[Hashable]) -> set[Hashable]:
        """Which running items must stop (cancelled, or their client went away)."""

    def done(self, results: list[tuple[Admission, Outcome]]) -> None:
        """Outcomes of finished items, in the order they finished."""

    def progress(self, partials: list[tuple[Admission, int, np.ndarray]]) -> None:
        """Partial images of running items: (the item, its partial-image index, pixels (H, W, 3) uint8)."""


@dataclass
class Observer:
    """Hooks, all optional: occupancy and time of every step, each item's wait before its first, and
    each item's outcome with the engine that ran it (a canary's live error rate)."""

    step: Callable[[str, int, float], None] | None = None
    waited: Callable[[str, float], None] | None = None
    finished: Callable[[str, StepEngine | None, Outcome], None] | None = None


@dataclass(eq=False)
class _Running:
    admission: Admission
    slot: Slot
    engine: StepEngine | None  # the engine that began the slot advances it to the end, even if a newer version arrives
    started: bool = False


class StepScheduler:
    """The running batch of one worker. Not thread-safe: one thread calls `tick`."""

    def __init__(
        self,
        engine_for: Callable[[str], StepEngine],
        max_batch: int,
        max_wait_s: float,
        policy: Policy = "step",
        observer: Observer | None = None,
        join_wait: float = 0.0,
        route: Callable[[Admission], StepEngine] | None = None,
    ) -> None:
        """`engine_for(model)` gives the engine new items start on; `route(admission)`, when given,
        replaces it per item (a canary version takes some jobs' items)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}. Given: {policy!r}")
        self.engine_for = engine_for
        self.route = route
        self.max_batch = 1 if policy == "none" else max_batch
        self.max_wait_s = max_wait_s
        self.policy = policy
        self.observer = observer or Observer()
        self.join_wait = join_wait
        self.running: list[_Running] = []
        self._retired = 0
        self._last_step_s = 0.0

    @property
    def engines(self) -> list[StepEngine]:
        """Engines that running items hold: a replaced model version is not closed while listed here."""
        return [r.engine for r in self.running if r.engine is not None]

    @property
    def tickets(self) -> list[Hashable]:
        """Tickets of the items in the running batch (for heartbeats)."""
        return [r.admission.ticket for r in self.running]

    def tick(self, source: WorkSource, idle_wait_s: float, admit: bool = True) -> None:
        """One step boundary: drop, admit, advance, retire. Blocks up to `idle_wait_s` when idle."""
        if self.running:
            self._drop(source)  # first, so that a freed slot is refilled at this same boundary
        if admit:
            self._admit(source, idle_wait_s)
        if not self.running:
            return
        finished: list[_Running] = []
        shown: list[tuple[Admission, int, np.ndarray]] = []
        for (model, engine), group in self._by_engine().items():
            now = time.time()
            for r in group:
                if not r.started:
                    r.started = True
                    if self.observer.waited is not None:
                        self.observer.waited(model, max(0.0, now - r.admission.queued_at))
            t0 = time.perf_counter()
            try:
                engine.advance([r.slot for r in group])
            except Exception as e:  # the engine broke its contract: fail these items, keep serving
                for r in group:
                    r.slot.outcome = GenerationFailed(f"engine error: {type(e).__name__}")
            self._last_step_s = time.perf_counter() - t0
            if self.observer.step is not None:
                self.observer.step(model, len(group), self._last_step_s)
            finished += [r for r in group if r.slot.done]
            shown += self._partials(group)
        if shown:
            source.progress(shown)
        self._retire(source, finished)

    @staticmethod
    def _partials(group: list[_Running]) -> list[tuple[Admission, int, np.ndarray]]:
        """The partial images the last step made, each with its index among its item's partials; taken off the slots."""
        out = []
        for r in group:
            shown, r.slot.partial = r.slot.partial, None
            if shown is not None and not r.slot.done:
                out.append((r.admission, *shown))
        return out

    def _admit(self, source: WorkSource, idle_wait_s: float) -> None:
        busy = len(self.running) if self.policy == "step" else self.max_batch * bool(self.running)
        free = self.max_batch - busy
        if free <= 0:
            return
        if self.running:
            new = source.take(free, 0.0, 0.0)  # everything already waiting joins
            # Items just left: their clients may be about to send the next request. Waiting a small fraction
            # of a step for that many newcomers fills the batch; otherwise they would wait a whole step for the
            # next boundary. (Items that were already waiting do not count: they are not those clients.)
            expect = min(free - len(new), self._retired)
            if expect > 0 and self.join_wait > 0:
                wait = self.join_wait * self._last_step_s
                new += source.take(expect, wait, wait)
        else:
            new = source.take(free, idle_wait_s, self.max_wait_s if self.policy != "none" else 0.0)
        if not new:
            return
        done: list[_Running] = []
        by_model: dict[str, list[Admission]] = {}
        for a in new:
            by_model.setdefault(a.model, []).append(a)
        for model, admissions in by_model.items():
            # Each item asks for its engine: during a canary, items of one model start on two versions.
            by_engine: dict[int, tuple[StepEngine | None, list[Admission]]] = {}
            for a in admissions:
                engine: StepEngine | None = None
                try:
                    engine = self.route(a) if self.route is not None else self.engine_for(model)
                except FewstepError as e:
                    done.append(_Running(a, Slot(item=a.item, outcome=e), None))
                    continue
                by_engine.setdefault(id(engine), (engine, []))[1].append(a)
            for engine, group in by_engine.values():
                assert engine is not None
                slots = self._begin(engine, group)
                for a, slot in zip(group, slots, strict=True):
                    (done if slot.done else self.running).append(_Running(a, slot, engine))
        self._retire(source, done)

    def _begin(self, engine: StepEngine, group: list[Admission]) -> list[Slot]:
        """Begin `group` in one call; if that call fails, begin each item alone, so that one item's input
        (a prompt its tokenizer refuses, say) fails that item only and never its neighbours, which may be
        other clients' requests. Beginning is side-effect free, so a retry sees the same inputs."""
        try:
            return engine.begin([a.item for a in group])
        except Exception as e:
            if len(group) > 1:
                return [slot for a in group for slot in self._begin(engine, [a])]
            failed = e if isinstance(e, FewstepError) else GenerationFailed(f"engine error: {type(e).__name__}")
            return [Slot(item=group[0].item, outcome=failed)]

    def _drop(self, source: WorkSource) -> None:
        gone = source.dropped(self.tickets)
        if not gone:
            return
        stopped = [r for r in self.running if r.admission.ticket in gone]
        for r in stopped:
            r.slot.outcome = cancelled(r.slot)
        self._retire(source, stopped)

    def _by_engine(self) -> dict[tuple[str, StepEngine], list[_Running]]:
        groups: dict[tuple[str, StepEngine], list[_Running]] = {}
        for r in self.running:
            assert r.engine is not None  # running slots were begun by an engine
            groups.setdefault((r.admission.model, r.engine), []).append(r)
        return groups

    def _retire(self, source: WorkSource, finished: list[_Running]) -> None:
        self._retired = len(finished)
        if not finished:
            return
        leaving = set(map(id, finished))
        self.running = [r for r in self.running if id(r) not in leaving]
        if self.observer.finished is not None:
            for r in finished:
                if r.slot.outcome is not None:
                    self.observer.finished(r.admission.model, r.engine, r.slot.outcome)
        source.done([(r.admission, r.slot.outcome) for r in finished if r.slot.outcome is not None])


@dataclass(eq=False)
class LocalTicket:
    """An in-process request for one image: its future, and a flag its caller may raise to cancel."""

    future: Future[Outcome] = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: int = 0

    def __hash__(self) -> int:
        return self.seq


class LocalSource:
    """An in-process `WorkSource` with a bounded FIFO: `submit` returns one ticket per item.

    For using the scheduler as a library, and for the batching benchmark.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._queue: deque[Admission] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, model: str, items: list[ImageItem]) -> list[LocalTicket]:
        """Queue all items or none (`Overloaded` when they do not fit)."""
        tickets = [LocalTicket(seq=next(self._ids)) for _ in items]
        with self._cv:
            if len(self._queue) + len(items) > self.max_queue:
                raise Overloaded(f"queue full: {len(self._queue)} items waiting, limit {self.max_queue}")
            now = time.time()
            self._queue.extend(Admission(t, model, it, now) for t, it in zip(tickets, items, strict=True))
            self._cv.notify_all()
        return tickets

    def take(self, n: int, wait_s: float, gather_s: float) -> list[Admission]:
        with self._cv:
            if not self._queue and wait_s > 0:
                self._cv.wait_for(lambda: bool(self._queue), timeout=wait_s)
            if self._queue and gather_s > 0 and len(self._queue) < n:
                self._cv.wait_for(lambda: len(self._queue) >= n, timeout=gather_s)
            taken: list[Admission] = []
            while self._queue and len(taken) < n:
                a = self._queue.popleft()
                ticket = a.ticket
                assert isinstance(ticket, LocalTicket)
                if ticket.cancel.is_set():
                    ticket.future.set_result(Cancelled("cancelled before it started"))
                else:
                    taken.append(a)
            return taken

    def dropped(self, tickets: list[Hashable]) -> set[Hashable]:
        return {t for t in tickets if isinstance(t, LocalTicket) and t.cancel.is_set()}

    def done(self, results: list[tuple[Admission, Outcome]]) -> None:
        for a, outcome in results:
            assert isinstance(a.ticket, LocalTicket)
            a.ticket.future.set_result(outcome)

    def progress(self, partials: list[tuple[Admission, int, np.ndarray]]) -> None:
        """Partial images are not kept: a library caller that wants them drives the engine itself."""
