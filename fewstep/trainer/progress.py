"""Progress lines for long training loops (window means, elapsed time and an ETA), and the heartbeat file a
liveness probe reads: every training step, every chunk of teacher pairs and every round touch it, so a loop
that stops moving (a hang, not a crash) is seen as dead and restarted."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

_heartbeat: Path | None = None
_last_beat = 0.0
BEAT_EVERY_S = 5.0
"""A file's modification time is touched at most this often (a training step may take milliseconds)."""


def heartbeat_to(path: Path | None) -> None:
    """Touch `path` from now on at every `beat()` (None: no heartbeat). Called once, by the command."""
    global _heartbeat, _last_beat
    _heartbeat, _last_beat = path, 0.0
    beat()


def beat() -> None:
    """The training loop moved: touch the heartbeat file (at most every `BEAT_EVERY_S`)."""
    global _last_beat
    if _heartbeat is None or time.monotonic() - _last_beat < BEAT_EVERY_S:
        return
    _last_beat = time.monotonic()
    _heartbeat.parent.mkdir(parents=True, exist_ok=True)
    _heartbeat.touch()
    os.utime(_heartbeat)


class Progress:
    """Call `update(**values)` once per step; prints every `every` steps and at the last one."""

    def __init__(self, label: str, total: int, every: int = 50) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.t0 = time.time()
        self._sums: defaultdict[str, float] = defaultdict(float)
        self._count = 0

    def update(self, **values: float) -> None:
        beat()
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
