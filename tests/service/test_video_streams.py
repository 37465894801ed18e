"""`VideoStreams` loading video models from a real registry: a student's first-frame image model is
resolved by sha256, and a student whose image model the registry lacks is refused, with the reason,
while the others load."""

from __future__ import annotations

from pathlib import Path

from fewstep.models.registry import Registry
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.video import VideoStreams


def _streams(registry: Registry) -> VideoStreams:
    settings = Settings(registry=registry.root, video_max_sessions=1, threads=1)
    return VideoStreams(settings, Metrics(), registry)


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
