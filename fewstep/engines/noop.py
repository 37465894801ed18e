"""A no-op engine: the `StepEngine` contract with no network, for measuring the plumbing around it.

`bench/jobqueue.py` uses it to measure what the queue, the workers and the gateway cost by
themselves, and the queue tests use it where the test is about delivery, not about images.
It honours every part of the contract a real engine does (steps, per-step stop checks, one
outcome per item, validation by its spec) and takes `step_s` of wall time per batched step.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from fewstep.engines.base import ImageItem, ImageResult, Outcome, Slot, StopCheck, run_to_completion
from fewstep.engines.specs import ImageSpec
from fewstep.errors import FewstepError
from fewstep.models.schedules import default_student_schedule


def noop_spec(model: str = "noop", size: int = 32) -> ImageSpec:
    """1–4 steps (default 1), `size`×`size`, hybrid accepted (and charged its teacher's extra evaluation)."""
    return ImageSpec(
        model=model,
        version="noop",
        step_counts=tuple(default_student_schedule().steps),
        default_steps=1,
        size=f"{size}x{size}",
        backend="noop",
        precision="none",
        hybrid=True,
    )


class NoopEngine:
    """Serves flat images whose colour is derived from (prompt, seed): any model name, or the version `spec`
    describes (a registry version served through the protocols, with no weights)."""

    def __init__(self, model: str = "noop", step_s: float = 0.0, size: int = 32, spec: ImageSpec | None = None) -> None:
        self.step_s = step_s
        self.spec = spec or noop_spec(model, size)
        self.evaluations = 0
        """Batched steps run (what a network evaluation would be): tests and benchmarks count them."""
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def warmup(self) -> None:
        return None

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        """`run_to_completion` on this engine: one outcome per item."""
        return run_to_completion(self, items, stop)

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        slots = [Slot(item=it) for it in items]
        for slot in slots:
            try:
                self.spec.validate(slot.item)
            except FewstepError as e:
                slot.outcome = e
        return slots

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live:
            return
        if self.step_s:
            time.sleep(self.step_s)  # one "network evaluation" for the whole batch
        self.evaluations += 1
        for s in live:
            s.steps_run += 1
            if s.steps_run == s.item.steps:
                it = s.item
                s.outcome = ImageResult(self._pixels(it), it.seed, it.steps, self.spec.nfe(it), self.spec.version)

    def _pixels(self, item: ImageItem) -> np.ndarray:
        rgb = hashlib.sha256(f"{item.prompt}|{item.seed}".encode()).digest()[:3]
        return np.broadcast_to(np.frombuffer(rgb, dtype=np.uint8), (self.spec.height, self.spec.width, 3)).copy()

    def close(self) -> None:
        self.loaded = False
