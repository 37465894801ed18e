"""The trainer's heartbeat: training steps touch the file a liveness probe reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fewstep.trainer import progress


def test_every_training_step_keeps_the_heartbeat_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "BEAT_EVERY_S", 0.0)
    heartbeat = tmp_path / "work" / "heartbeat"
    try:
        progress.heartbeat_to(heartbeat)
        assert heartbeat.exists()
        stale = time.time() - 3600
        os.utime(heartbeat, (stale, stale))
        progress.Progress("student step", 10, every=100).update(loss=0.5)
        assert time.time() - heartbeat.stat().st_mtime < 60
    finally:
        progress.heartbeat_to(None)
