"""Progress lines for long training loops: window means, elapsed time and an ETA."""

from __future__ import annotations

import time
from collections import defaultdict


class Progress:
    """Call `update(**values)` once per step; prints every `every` steps and at the last one."""

    def __init__(self, label: str, total: int, every: int = 50) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.t0 = time.time()
        self._sums: defaultdict[str, float] = defaultdict(float)
        self._count = 0

    def update(self, **values: float) -> None:
        self.done += 1
        self._count += 1
        for k, v in values.items():
            self._sums[k] += v
        if self.done % self.every == 0 or self.done == self.total:
            el = time.time() - self.t0
            means = " ".join(f"{k} {s / self._count:.4f}" for k, s in self._sums.items())
            eta = el / self.done * (self.total - self.done)
            print(f"  {self.label} {self.done}/{self.total} {means} ({el:.0f}s, eta {eta:.0f}s)", flush=True)
            self._sums.clear()
            self._count = 0
