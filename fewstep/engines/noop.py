"""A no-op engine: the `Engine` contract with no network, for measuring the plumbing around it.

`bench/jobqueue.py` uses it to measure what the queue, the workers and the gateway cost by
themselves, and the queue tests use it where the test is about delivery, not about images.
It honours every part of the contract a real engine does (a `Stepper`: steps, per-step stop
checks, one outcome per item) and takes `step_s` of wall time per batched denoising step.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from fewstep.engines.base import EngineInfo, ImageItem, ImageResult, Outcome, Slot, StopCheck, run_to_completion
from fewstep.errors import FewstepError, limit_error


class NoopEngine:
    """Serves any model name with flat images whose colour is derived from (prompt, seed)."""

    def __init__(self, model: str = "noop", step_s: float = 0.0, size: int = 32) -> None:
        self.step_s = step_s
        self.size = size
        self.info = EngineInfo(
            model=model,
            version="noop",
            kind="image",
            steps=[1, 2, 3, 4],
            default_steps=1,
            size=f"{size}x{size}",
            backend="noop",
            precision="none",
        )
        self._steps = 0

    def load(self) -> None:
        return None

    def warmup(self) -> None:
        return None

    def validate(self, item: ImageItem) -> None:
        if item.steps not in self.info.steps:
            raise limit_error("steps", "between 1 and 4", item.steps)

    def nfe(self, item: ImageItem) -> int:
        return item.steps

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        return run_to_completion(self, items, stop)

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        slots = [Slot(item=it) for it in items]
        for slot in slots:
            try:
                self.validate(slot.item)
            except FewstepError as e:
                slot.outcome = e
        return slots

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live:
            return
        if self.step_s:
            time.sleep(self.step_s)  # one "network evaluation" for the whole batch
        self._steps += 1
        for s in live:
            s.steps_run += 1
            if s.steps_run == s.item.steps:
                it = s.item
                s.outcome = ImageResult(self._pixels(it), it.seed, it.steps, it.steps, self.info.version)

    def _pixels(self, item: ImageItem) -> np.ndarray:
        rgb = hashlib.sha256(f"{item.prompt}|{item.seed}".encode()).digest()[:3]
        return np.broadcast_to(np.frombuffer(rgb, dtype=np.uint8), (self.size, self.size, 3)).copy()

    def health(self) -> dict[str, Any]:
        return {"loaded": True, "steps": self._steps, "last_error": None, "checked_at": time.time()}

    def close(self) -> None:
        return None
