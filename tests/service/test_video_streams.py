"""`VideoStreams` on a real registry: a student's first-frame image model is resolved by sha256, and a
student whose image model the registry lacks is refused, with the reason, while the others load. A new
version of a video model takes new sessions while open ones finish on theirs; a version that cannot load
is refused and the one serving goes on."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.engines.video import Frame
from fewstep.models.checkpoint import load_checkpoint, save_checkpoint
from fewstep.models.registry import Registry
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.video import VideoStreams


def _streams(registry: Registry, **settings: Any) -> VideoStreams:
    """`VideoStreams` on `registry`: one session, one thread, and `settings` over those."""
    fields = {"video_max_sessions": 1, "threads": 1, **settings}
    return VideoStreams(Settings(registry=registry.root, **fields), Metrics(), registry)


def test_a_video_student_loads_with_the_image_model_its_manifest_names(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(checkpoints / "shapes-video", promote=True)
    alone = _streams(registry)
    alone._load(encoder)
    assert "shapes-video" not in alone.engines
    assert "first-frame image model 'shapes'" in alone.refused["shapes-video"]
    assert str(tmp_path) not in alone.refused["shapes-video"]  # registry paths stay out of messages

    # Another model under the name "shapes" is not the one named: the sha256 decides.
    registry.publish(checkpoints / "shapes-teacher", model="shapes", version="1")
    wrong = _streams(registry)
    wrong._load(encoder)
    assert "first-frame image model 'shapes'" in wrong.refused["shapes-video"]

    registry.publish(checkpoints / "shapes")  # version 2 of "shapes": the named weights
    registry.publish(checkpoints / "shapes-teacher", promote=True)
    streams = _streams(registry)
    streams._load(encoder)
    engine = streams.engines["shapes-video"]
    assert engine.first_frame is not None and engine.first_frame.info.model == "shapes"
    assert engine.info.extra["hybrid"] is True  # the image student's teacher is in the registry
    s = engine.open("a red circle moving left quickly", 2, 1, 0)
    frames = []
    while not s.finished:
        frames += engine.advance([s])
    assert [f.index for f in frames] == [0, 1]


class _Client:
    """Collects a stream's frames as the driver thread delivers them, and reads each at once."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.streams: VideoStreams | None = None
        self.stream = None  # type: ignore[var-annotated]

    def deliver(self, frame: Frame | None, png: str) -> None:
        assert frame is not None, "the engine failed"
        self.frames.append(frame)
        assert self.streams is not None and self.stream is not None
        self.streams.sent(self.stream)


def _open(streams: VideoStreams, frames: int) -> _Client:
    client = _Client()
    client.streams = streams
    ready = threading.Event()

    def deliver(frame: Frame | None, png: str) -> None:
        ready.wait()  # the first frame can come before `open` returns
        client.deliver(frame, png)

    client.stream = streams.open("shapes-video", "a blue square moving down slowly", frames, 1, 7, deliver)
    ready.set()
    return client


def _wait(what, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_new_video_version_takes_new_sessions_while_open_ones_finish_on_theirs(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(checkpoints / "shapes", promote=True)
    registry.publish(checkpoints / "shapes-video", version="1", promote=True)
    streams = _streams(registry, video_max_sessions=2, watch_interval_s=3600.0, video_buffer_frames=1)
    seeded = threading.Event()
    seeded.set()
    streams.start(seeded, lambda: encoder)
    try:
        assert streams.loaded.wait(120)
        old = streams.engine("shapes-video")
        first = _open(streams, 12)
        _wait(lambda: len(first.frames) >= 2)

        registry.publish(checkpoints / "shapes-video", version="2", promote=True)  # a push
        streams.maintain()
        new = streams.engine("shapes-video")
        assert (old.info.version, new.info.version) == ("1", "2")
        second = _open(streams, 3)
        assert second.stream.engine is new and first.stream.engine is old
        assert streams._active("shapes-video") == 2
        assert streams.statuses["shapes-video"] == {"1": ("draining", None), "2": ("serving", None)}

        _wait(lambda: len(first.frames) == 12 and len(second.frames) == 3)
        assert [f.index for f in first.frames] == list(range(12))  # not one frame lost or repeated
        assert all(np.isfinite(f.pixels).all() for f in first.frames + second.frames)
        assert old in streams._retired
        streams.maintain()
        assert old in streams._retired  # its session is still open
        streams.close_stream(first.stream)
        streams.close_stream(second.stream)
        streams.maintain()
        assert streams._retired == []  # drained: dropped
        assert streams.statuses["shapes-video"] == {"2": ("serving", None)}

        # A version that cannot load is refused with the reason; version 2 goes on serving.
        bad = tmp_path / "bad"
        shutil.copytree(checkpoints / "shapes-video", bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["first_frame"]["sha256"] = "0" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        registry.publish(bad, version="3", promote=True)
        streams.maintain()
        assert streams.engine("shapes-video") is new
        assert streams.refused["shapes-video"].startswith("version 3: its first-frame image model 'shapes'")
        assert streams.statuses["shapes-video"]["3"][0] == "refused"
        assert str(tmp_path) not in streams.statuses["shapes-video"]["3"][1]
        third = _open(streams, 2)
        _wait(lambda: len(third.frames) == 2)
        streams.close_stream(third.stream)

        registry.rollback("shapes-video", to="1")  # and a rollback is followed like a push
        streams.maintain()
        assert streams.engine("shapes-video").info.version == "1"
        assert "shapes-video" not in streams.refused
    finally:
        streams.close()


def test_the_video_gate_refuses_a_version_whose_shapes_stopped_moving(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    registry = Registry(tmp_path / "registry")
    for name in ("shapes", "shapes-video-judge", "shapes-video"):
        registry.publish(checkpoints / name, promote=True)
    streams = _streams(registry, video_max_sessions=4, watch_interval_s=3600.0)
    streams._load(encoder)
    streams.loaded.set()
    serving = streams.engine("shapes-video").info.version
    passed = registry.verdict("shapes-video", serving, "video-torch")
    assert passed is not None and passed["passed"] is True
    assert passed["metrics"]["joint_accuracy"] >= 0.9 and passed["metrics"]["motion_accuracy"] >= 0.9

    # A student whose correction head is zero: every frame is a copy of the last (residual form).
    manifest, state = load_checkpoint(checkpoints / "shapes-video")
    state = {k: (torch.zeros_like(v) if k.startswith("conv_out.") else v) for k, v in state.items()}
    save_checkpoint(tmp_path / "frozen", state, {k: v for k, v in manifest.items() if k != "files"})
    _, frozen = registry.publish(tmp_path / "frozen", promote=True)
    streams.maintain()
    assert streams.engine("shapes-video").info.version == serving  # still serving
    status, reason = streams.statuses["shapes-video"][frozen]
    assert status == "refused" and reason is not None
    assert "refused by the video gate: quality regression: motion accuracy" in reason
    verdict = registry.verdict("shapes-video", frozen, "video-torch")
    assert verdict is not None and verdict["passed"] is False
    assert verdict["metrics"]["joint_accuracy"] >= 0.9  # it still draws the shapes; it no longer moves them
    streams.close()
