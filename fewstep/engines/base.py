"""The `Engine` protocol and the item/result types every engine shares.

A batch goes in, a same-length list of results-or-errors comes out: one bad item never
fails its neighbours (Triton python_backend's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fewstep.errors import Cancelled, FewstepError


@dataclass(frozen=True)
class ImageItem:
    """One image to make. `steps` counts student steps; `seed` fixes every noise draw."""

    prompt: str
    seed: int
    steps: int
    hybrid: bool = False


@dataclass(frozen=True)
class ImageResult:
    """Pixels (H, W, 3) uint8 and what it cost."""

    pixels: np.ndarray
    seed: int
    steps: int
    nfe: int
    version: str | None = None
    """The model version that made it (the engine that began the item, across a hot swap)."""


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves, as `/v1/models` reports it."""

    model: str
    version: str
    kind: str
    steps: list[int]
    default_steps: int
    size: str
    backend: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)


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

    @property
    def done(self) -> bool:
        return self.outcome is not None


@runtime_checkable
class Engine(Protocol):
    """The contract between the service and anything that generates.

    Lifecycle: `load` once (raises `CheckpointError` if the artifact is refused), `warmup`
    before the first request, `run` any number of times from one thread at a time,
    `close` at shutdown. `health` may be called from any thread at any time.
    """

    info: EngineInfo

    def load(self) -> None:
        """Read and verify the artifact; make the engine ready to run."""

    def warmup(self) -> None:
        """Run every step count once so that the first request pays no first-call costs."""

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        """One result or one error per item, in order.

        `stop(k, active)` is asked at every step boundary which of the active items (indices
        into `items`) to drop; those come back as `Cancelled`.
        """

    def health(self) -> dict[str, Any]:
        """Liveness details: loaded, batches run, last error."""

    def close(self) -> None:
        """Release memory; the engine may not be used afterwards."""


@runtime_checkable
class Stepper(Protocol):
    """An engine that can be driven one denoising step at a time (step-level batching).

    `begin` turns items into slots (an invalid item comes back as its error, already done);
    `advance` runs one network evaluation for every slot, each at its own step, and sets
    `outcome` on the slots that finished. Slots of any age may share an `advance` call.
    """

    info: EngineInfo

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        """One slot per item, in order."""

    def advance(self, slots: list[Slot]) -> None:
        """One step for every slot that is not done."""


def run_to_completion(engine: Stepper, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
    """`Engine.run` for steppers: all items start together; each leaves the batch when it finishes."""
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
