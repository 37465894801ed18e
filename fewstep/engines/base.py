"""The engine protocols the service drives, and the work items and results that cross them.

Two kinds of engine, one lifecycle:

* `StepEngine` makes images a denoising step at a time: `begin` turns items into slots, `advance`
  runs one network evaluation for any mix of slots (step-level batching across requests);
* `StreamEngine` makes streams frame by frame in sessions: `open`, `steer`, `advance`, `end`.

Both are `Servable`: `load` once, `warmup`, `close`, and a `spec` (`engines.specs`) that says what
requests the loaded version takes. That lifecycle is all the service's version handling needs
(service/versions.py); what a request may ask is the spec's business, and a gateway that runs no engine
builds the same spec from the manifest alone.

A batch goes in, one result-or-error per item comes out: one bad item never fails its neighbours
(Triton python_backend's rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fewstep.engines.specs import ImageItem, ImageSpec, Spec, StreamRequest, VideoSpec
from fewstep.errors import Cancelled, FewstepError


@dataclass(frozen=True)
class ImageResult:
    """Pixels (H, W, 3) uint8 and what it cost."""

    pixels: np.ndarray
    seed: int
    steps: int
    nfe: int
    version: str | None = None
    """The model version that made it (the engine that began the item, across a hot swap)."""


Outcome = ImageResult | FewstepError
StopCheck = Callable[[int, list[int]], Collection[int]]
"""`stop(k, active)` → which of the active item indices to drop before step k (cancelled work)."""


@dataclass(eq=False)
class Slot:
    """One item in a running step-level batch: the engine's private state and, once done, its outcome."""

    item: ImageItem
    state: Any = None
    steps_run: int = 0
    outcome: Outcome | None = None
    partial: tuple[int, np.ndarray] | None = None
    """A partial image the last `advance` made (the item asked for partials and that step is one of its
    `partial_steps`): its index among the item's partials and its (H, W, 3) uint8 pixels; whoever drives the
    engine sends it on and clears it."""

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(eq=False)
class Session:
    """One open stream. The engine keeps its own per-session state in `state`.

    `frame` is the index of the frame being made; `prompt` is the prompt of the frames from the next
    one on (a `steer` takes effect at the next frame)."""

    request: StreamRequest
    prompt: str
    frame: int = 0
    closed: bool = False
    opened_at: float = field(default_factory=time.perf_counter)
    state: Any = None
    error: FewstepError | None = None
    """Why the session failed alone (an engine that can tell one session's failure from its batch's sets it, e.g.
    on non-finite frames): it is ended, its slot free, and the sessions that shared its `advance` go on."""

    @property
    def finished(self) -> bool:
        return self.frame >= self.request.frames


@dataclass(frozen=True)
class Frame:
    """A finished frame of a session: (H, W, 3) uint8 pixels."""

    session: Session
    index: int
    pixels: np.ndarray


@runtime_checkable
class Servable(Protocol):
    """The lifecycle every engine shares. `load` raises `CheckpointError` when the artifact is refused;
    `warmup` runs every step count once, so that the first request pays no first-call costs."""

    @property
    def spec(self) -> Spec: ...

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def close(self) -> None:
        """Release memory; the engine may not be used afterwards."""


@runtime_checkable
class StepEngine(Servable, Protocol):
    """An engine driven one denoising step at a time (step-level batching).

    `begin` turns items into slots (an invalid item comes back as its error, already done);
    `advance` runs one network evaluation for every slot that is not done, each at its own step,
    and sets `outcome` on the slots that finished. Slots of any age may share an `advance` call;
    one thread at a time calls them."""

    @property
    def spec(self) -> ImageSpec: ...

    def begin(self, items: list[ImageItem]) -> list[Slot]: ...

    def advance(self, slots: list[Slot]) -> None: ...


@runtime_checkable
class StreamEngine(Servable, Protocol):
    """An engine of streaming sessions, up to `capacity` at once.

    `open` admits a session (`Overloaded` when full), `steer` changes its prompt from its next frame,
    `end` frees it; any thread may call these. `advance` (one driver thread) takes one step for each
    session given, in one batched call, and returns the frames that finished. A session that fails alone comes
    back ended with its `error` set; an exception from `advance` fails every session given."""

    @property
    def spec(self) -> VideoSpec: ...

    @property
    def capacity(self) -> int: ...

    @property
    def active(self) -> int: ...

    def open(self, request: StreamRequest) -> Session: ...

    def steer(self, session: Session, prompt: str) -> None: ...

    def end(self, session: Session) -> None: ...

    def advance(self, sessions: list[Session]) -> list[Frame]: ...


def partial_steps(run_steps: int, partials: int) -> tuple[int, ...]:
    """After which of its steps (1-based, of those it runs) an item asking for `partials` partial images gets one:
    spread evenly over the steps before its last (whose image is the final one, not a partial), so fewer than
    asked when it runs fewer steps (OpenAI's rule: partials may be fewer than asked)."""
    before = run_steps - 1
    if partials <= 0 or before <= 0:
        return ()
    return tuple(sorted({-(-(i + 1) * before // min(partials, before)) for i in range(min(partials, before))}))


def partial_index(run_steps: int, partials: int, steps_run: int) -> int | None:
    """Which partial image (0-based) an item shows after its `steps_run`-th step, or None."""
    shown = partial_steps(run_steps, partials)
    return shown.index(steps_run) if steps_run in shown else None


def run_to_completion(engine: StepEngine, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
    """All items start together; each leaves the batch when it finishes. One outcome per item, in order.

    `stop(k, active)` is asked at every step boundary which of the active items (indices into `items`)
    to drop; those come back as `Cancelled`."""
    slots = engine.begin(items)
    k = 0
    while active := [i for i, s in enumerate(slots) if not s.done]:
        for i in stop(k, active) if stop is not None else ():
            if not slots[i].done:
                slots[i].outcome = cancelled(slots[i])
        if live := [slots[i] for i in active if not slots[i].done]:
            engine.advance(live)
        k += 1
    return [s.outcome for s in slots if s.outcome is not None]


def cancelled(slot: Slot) -> Cancelled:
    return Cancelled(f"cancelled before step {slot.steps_run + 1} of {slot.item.steps}")


def stream_alone(engine: StreamEngine, request: StreamRequest) -> list[Frame]:
    """A session of `request` on `engine`, advanced alone until it finishes and then ended (also when it fails): its
    frames, in order; the session's `error` raised when it failed. What a warm-up runs."""
    session = engine.open(request)
    frames: list[Frame] = []
    try:
        while not session.finished:
            frames += engine.advance([session])
            if session.error is not None:
                raise session.error
    finally:
        engine.end(session)
    return frames
