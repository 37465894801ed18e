"""Video models in the version lifecycle, in process: a student's first-frame image model is resolved by
sha256, and a student whose image model the registry lacks is refused, with the reason, while the others
load. A new version takes new sessions (after a canary share, when one is set) while open ones finish on
theirs; a version that cannot load or fails the video gate is refused and the one serving goes on."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import Frame, StreamRequest
from fewstep.models.checkpoint import load_checkpoint, save_checkpoint
from fewstep.models.registry import Registry
from fewstep.service import streams as streams_module
from fewstep.service.app import stream_kinds
from fewstep.service.kinds import Context
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.streams import Stream, VideoStreams
from fewstep.service.versions import Versions

pytestmark = pytest.mark.slow  # each test loads and gates the shipped video student
MODEL = "shapes-video"


def _streams(registry: Registry, encoder: Any, **settings: Any) -> VideoStreams:
    """`VideoStreams` on `registry`: one session, one thread, and `settings` over those; the process's
    text encoder is the test session's."""
    fields = {"video_max_sessions": 1, "threads": 1, **settings}
    ctx = Context(Settings(registry=registry.root, **fields), registry)
    ctx._encoder = encoder
    return VideoStreams(ctx.settings, Metrics(), Versions(ctx, Metrics(), stream_kinds(), loader="test"))


def _running(tmp_path: Path, checkpoints: Path, encoder: Any, **settings: Any) -> tuple[Registry, VideoStreams]:
    """A registry holding the video student (version 1) and its image model, and started `VideoStreams` on it
    with two sessions, no timed registry watch (the tests call `maintain`) and `settings` over those."""
    registry = Registry(tmp_path / "registry")
    registry.publish(checkpoints / "shapes", promote=True)
    registry.publish(checkpoints / MODEL, version="1", promote=True)
    streams = _streams(registry, encoder, **{"video_max_sessions": 2, "watch_interval_s": 3600.0, **settings})
    seeded = threading.Event()
    seeded.set()
    streams.start(seeded)
    assert streams.versions.loaded.wait(120)
    return registry, streams


def _status(streams: VideoStreams, version: str) -> tuple[str, str | None]:
    return streams.versions.models[MODEL].statuses[version]


def _serving(streams: VideoStreams) -> str | None:
    serving = streams.versions.models[MODEL].serving
    return serving.version if serving is not None else None


def settle(streams: VideoStreams, until: float = 120.0) -> None:
    """Follow the registry as the watch thread does, until no load is in flight."""
    deadline = time.monotonic() + until
    streams.versions.nudged.set()
    while time.monotonic() < deadline:
        streams.maintain()
        if not streams.versions.loading:
            streams.maintain()
            return
        time.sleep(0.05)
    raise AssertionError("the load never ended")


def test_a_video_student_loads_with_the_image_model_its_manifest_names(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(checkpoints / MODEL, promote=True)
    alone = _streams(registry, encoder)
    alone.versions.load()
    assert _serving(alone) is None
    status, why = _status(alone, "1")
    assert status == "refused" and why is not None and "first-frame image model 'shapes'" in why
    assert str(tmp_path) not in why  # registry paths stay out of messages

    # Another model under the name "shapes" is not the one named: the sha256 decides.
    registry.publish(checkpoints / "shapes-teacher", model="shapes", version="1")
    wrong = _streams(registry, encoder)
    wrong.versions.load()
    assert _serving(wrong) is None

    registry.publish(checkpoints / "shapes")  # version 2 of "shapes": the named weights
    registry.publish(checkpoints / "shapes-teacher", promote=True)
    streams = _streams(registry, encoder)
    streams.versions.load()
    engine = streams.versions.engine(MODEL)
    assert engine.first_frame is not None and engine.first_frame.spec.model == "shapes"
    assert engine.spec.hybrid is True  # the image student's teacher is in the registry
    s = engine.open(StreamRequest("a red circle moving left quickly", 2, 1, 0))
    frames = []
    while not s.finished:
        frames += engine.advance([s])
    assert [f.index for f in frames] == [0, 1]


class _Client:
    """Collects a stream's frames as the driver thread delivers them, and reads each at once."""

    def __init__(self, streams: VideoStreams) -> None:
        self.frames: list[Frame] = []
        self.streams = streams
        self.stream: Stream | None = None

    def deliver(self, frame: Frame | None, png: str) -> None:
        assert frame is not None, "the engine failed"
        self.frames.append(frame)
        assert self.stream is not None
        self.streams.sent(self.stream)


def _open(streams: VideoStreams, frames: int, seed: int = 7) -> _Client:
    client = _Client(streams)
    ready = threading.Event()

    def deliver(frame: Frame | None, png: str) -> None:
        ready.wait()  # the first frame can come before `open` returns
        client.deliver(frame, png)

    request = StreamRequest("a blue square moving down slowly", frames, 1, seed)
    client.stream = streams.open(MODEL, request, deliver)
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
    registry, streams = _running(tmp_path, checkpoints, encoder, video_buffer_frames=1)
    try:
        old = streams.versions.engine(MODEL)
        first = _open(streams, 12)
        _wait(lambda: len(first.frames) >= 2)

        registry.publish(checkpoints / MODEL, version="2", promote=True)  # a push
        settle(streams)
        new = streams.versions.engine(MODEL)
        assert (old.spec.version, new.spec.version) == ("1", "2")
        second = _open(streams, 3)
        assert second.stream is not None and first.stream is not None
        assert second.stream.engine is new and first.stream.engine is old
        assert _status(streams, "1") == ("ready", None) and _status(streams, "2") == ("serving", None)

        _wait(lambda: len(first.frames) == 12 and len(second.frames) == 3)
        assert [f.index for f in first.frames] == list(range(12))  # not one frame lost or repeated
        assert all(np.isfinite(f.pixels).all() for f in first.frames + second.frames)
        streams.maintain()
        assert old.active == 1 and old._net is not None  # its session is still open: not unloaded
        streams.close_stream(first.stream)
        streams.close_stream(second.stream)
        _wait(lambda: (streams.maintain(), old._net is None)[1])  # drained: unloaded, 2 s after it left routing

        # A version that cannot load is refused with the reason; version 2 goes on serving.
        bad = tmp_path / "bad"
        shutil.copytree(checkpoints / MODEL, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["first_frame"]["sha256"] = "0" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        registry.publish(bad, version="3", promote=True)
        settle(streams)
        assert streams.versions.engine(MODEL) is new
        status, why = _status(streams, "3")
        assert status == "refused" and why is not None and why.startswith("its first-frame image model 'shapes'")
        assert str(tmp_path) not in why
        third = _open(streams, 2)
        _wait(lambda: len(third.frames) == 2)
        assert third.stream is not None
        streams.close_stream(third.stream)

        registry.rollback(MODEL, to="1")  # and a rollback is followed like a push
        settle(streams)
        assert streams.versions.engine(MODEL).spec.version == "1"
    finally:
        streams.close()


def test_a_session_that_fails_alone_ends_its_stream_and_its_neighbours_stream_on(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    """One session's conditioning turned to NaN (as a numerical blow-up would): the driver ends that stream with the
    engine's failure, while the stream batched beside it finishes every frame."""
    _, streams = _running(tmp_path, checkpoints, encoder)
    try:
        engine = streams.versions.engine(MODEL)
        ended = threading.Event()
        bad = _Client(streams)

        def deliver_bad(frame: Frame | None, png: str) -> None:
            if frame is None:
                ended.set()
            else:
                bad.frames.append(frame)

        good = _open(streams, 12, seed=3)
        bad.stream = streams.open(MODEL, StreamRequest("a red circle moving left quickly", 12, 1, 4), deliver_bad)
        with engine._lock:  # between two boundaries
            engine._text.k[:, bad.stream.session.state.row] = float("nan")
        assert ended.wait(60), "the poisoned stream never ended"
        assert bad.stream.failed and bad.stream.session.error is not None and len(bad.frames) < 12
        _wait(lambda: len(good.frames) == 12)
        assert [f.index for f in good.frames] == list(range(12))
        assert all(np.isfinite(f.pixels).all() for f in good.frames)
        assert good.stream is not None
        streams.close_stream(bad.stream)
        streams.close_stream(good.stream)
        assert engine.active == 0
    finally:
        streams.close()


def test_a_video_push_goes_through_a_canary_before_it_takes_every_session(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sessions meet the canary by a hash of a random key: with random keys all four canary sessions came first
    # one run in sixteen. Counted keys make the order fixed (their shares: 0.98, 0.09, 0.43, 0.08, 0.01, …).
    keys = itertools.count()
    monkeypatch.setattr(streams_module, "secrets", SimpleNamespace(token_hex=lambda _n: f"{next(keys):016x}"))
    registry, streams = _running(
        tmp_path, checkpoints, encoder, canary_fraction=0.5, canary_items=4, video_gate_streams=0
    )
    try:
        registry.publish(checkpoints / MODEL, version="2", promote=True)
        settle(streams)
        assert _status(streams, "2") == ("canary", None) and _serving(streams) == "1"
        served: list[str] = []
        while _status(streams, "2")[0] == "canary":
            client = _open(streams, 1, seed=len(served))
            _wait(lambda c=client: len(c.frames) == 1)  # type: ignore[misc]
            assert client.stream is not None
            served.append(client.stream.engine.spec.version)
            streams.close_stream(client.stream)
            streams.maintain()
            assert len(served) < 200, served
        assert {"1", "2"} <= set(served)  # both versions took sessions while the canary ran
        assert served.count("2") == 4  # promoted after exactly its canary sessions
        assert _status(streams, "2") == ("serving", None) and _serving(streams) == "2"
    finally:
        streams.close()


def test_the_video_gate_refuses_a_version_whose_shapes_stopped_moving(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    registry = Registry(tmp_path / "registry")
    for name in ("shapes", "shapes-video-judge", MODEL):
        registry.publish(checkpoints / name, promote=True)
    streams = _streams(registry, encoder, video_max_sessions=4, watch_interval_s=3600.0)
    streams.versions.load()
    serving = _serving(streams)
    assert serving is not None
    passed = registry.verdict(MODEL, serving, "video-torch")
    assert passed is not None and passed["passed"] is True
    assert passed["metrics"]["joint_accuracy"] >= 0.9 and passed["metrics"]["motion_accuracy"] >= 0.9

    # A student whose correction head is zero: every frame is a copy of the last (residual form).
    manifest, state = load_checkpoint(checkpoints / MODEL)
    state = {k: (torch.zeros_like(v) if k.startswith("conv_out.") else v) for k, v in state.items()}
    save_checkpoint(tmp_path / "frozen", state, {k: v for k, v in manifest.items() if k != "files"})
    _, frozen = registry.publish(tmp_path / "frozen", promote=True)
    settle(streams)
    assert _serving(streams) == serving  # still serving
    status, reason = _status(streams, frozen)
    assert status == "refused" and reason is not None
    assert reason.startswith("quality regression: motion accuracy")
    verdict = registry.verdict(MODEL, frozen, "video-torch")
    assert verdict is not None and verdict["passed"] is False
    assert verdict["metrics"]["joint_accuracy"] >= 0.9  # it still draws the shapes; it no longer moves them
    streams.close()
