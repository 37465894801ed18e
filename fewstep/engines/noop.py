"""A no-op engine: the `Engine` contract with no network, for measuring the plumbing around it.

`bench/queue.py` uses it to measure what the queue, the workers and the gateway cost by
themselves, and the queue tests use it where the test is about delivery, not about images.
It honours every part of the contract a real engine does (steps, per-step stop checks, one
outcome per item) and takes `step_s` of wall time per denoising step.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from fewstep.engines.base import EngineInfo, ImageItem, ImageResult, Outcome
from fewstep.errors import Cancelled, FewstepError, limit_error
from fewstep.models.sampling import StopCheck


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
        self._batches = 0

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
        outcomes: list[Outcome | None] = [None] * len(items)
        for i, item in enumerate(items):
            try:
                self.validate(item)
            except FewstepError as e:
                outcomes[i] = e
        live = [i for i, o in enumerate(outcomes) if o is None]
        for k in range(max((items[i].steps for i in live), default=0)):
            active = [i for i in live if k < items[i].steps and outcomes[i] is None]
            for i in stop(k, active) if stop is not None else ():
                outcomes[i] = Cancelled(f"cancelled before step {k + 1} of {items[i].steps}")
            if self.step_s:
                time.sleep(self.step_s)
        for i in live:
            if outcomes[i] is None:
                it = items[i]
                outcomes[i] = ImageResult(pixels=self._pixels(it), seed=it.seed, steps=it.steps, nfe=it.steps)
        self._batches += 1
        return [o for o in outcomes if o is not None]

    def _pixels(self, item: ImageItem) -> np.ndarray:
        rgb = hashlib.sha256(f"{item.prompt}|{item.seed}".encode()).digest()[:3]
        return np.broadcast_to(np.frombuffer(rgb, dtype=np.uint8), (self.size, self.size, 3)).copy()

    def health(self) -> dict[str, Any]:
        return {"loaded": True, "batches": self._batches, "last_error": None, "checked_at": time.time()}

    def close(self) -> None:
        return None
