"""The streaming video engine on the shipped video student: frame 0 is the image student's, sessions
batched at step boundaries make the same frames as each stream alone, rows are admitted and freed,
prompts steer, and ONNX matches torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fewstep.engines.base import ImageItem, Session, StreamRequest
from fewstep.engines.image import ImageEngine
from fewstep.engines.video import VideoEngine
from fewstep.errors import CheckpointError, InvalidRequest, Overloaded
from fewstep.models.checkpoint import read_manifest
from fewstep.models.sampling import frame_from_image, frame_noise, student_stream, to_pixels

PROMPT = "a red circle moving left quickly"
OTHER = "a blue square moving down slowly"


def _image(video_student: Path, encoder, teacher: bool = True) -> ImageEngine:  # type: ignore[no-untyped-def]
    """An engine on the image student the video student names for frame 0 (shipped beside it)."""
    ref = read_manifest(video_student)["first_frame"]
    folder = video_student.parent / ref["name"]
    return ImageEngine(folder, encoder, teacher_folder=video_student.parent / "shapes-teacher" if teacher else None)


@pytest.fixture(scope="module")
def engine(video_student: Path, encoder) -> VideoEngine:  # type: ignore[no-untyped-def]
    e = VideoEngine(video_student, encoder, capacity=3, first_frame=_image(video_student, encoder))
    e.load()
    return e


def _open(engine: VideoEngine, prompt: str, frames: int, steps: int, seed: int, hybrid: bool = False) -> Session:
    return engine.open(StreamRequest(prompt, frames, steps, seed, hybrid))


def _run(engine: VideoEngine, sessions: list[Session]) -> dict[int, list[np.ndarray]]:
    """Advance `sessions` to their ends (then close them); the frames each made here, in order."""
    out: dict[int, list[np.ndarray]] = {id(s): [] for s in sessions}
    first = {id(s): s.frame for s in sessions}
    while any(not s.finished for s in sessions):
        for f in engine.advance(sessions):
            assert f.index == first[id(f.session)] + len(out[id(f.session)])
            out[id(f.session)].append(f.pixels)
    for s in sessions:
        engine.end(s)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding: another batch shape may round a value to the next uint8 level."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def _alone(engine: VideoEngine, prompt: str, frames: int, steps: int, seed: int) -> np.ndarray:
    s = _open(engine, prompt, frames, steps, seed)
    return np.stack(_run(engine, [s])[id(s)])


def test_frame_0_is_the_image_students_picture_averaged_to_the_video_size(engine: VideoEngine) -> None:
    assert engine.first_frame is not None
    got = _alone(engine, PROMPT, 1, 3, 11)[0]
    (image,) = engine.first_frame.run([ImageItem(PROMPT, seed=11, steps=3)])
    assert not isinstance(image, Exception)
    k = image.pixels.shape[0] // engine.cfg.size
    assert k == 2
    blocks = image.pixels.astype(float).reshape(engine.cfg.size, k, engine.cfg.size, k, 3).mean(axis=(1, 3))
    assert np.abs(got.astype(float) - blocks).max() <= 1.0
    other = _alone(engine, PROMPT, 1, 3, 12)[0]
    assert not np.array_equal(got, other)  # the seed reaches the image model


def test_a_stream_equals_the_trainers_reference_sampler(engine: VideoEngine, encoder) -> None:  # type: ignore[no-untyped-def]
    cfg = engine.cfg
    frames = cfg.sink + cfg.window + 4  # past the window's roll-over
    got = _alone(engine, PROMPT, frames, 2, 7)
    net = engine.net
    assert engine.first_frame is not None
    (image,) = engine.first_frame.run([ImageItem(PROMPT, seed=7, steps=2)])
    assert not isinstance(image, Exception)
    ref = student_stream(
        net,
        net.text_kv(*encoder.encode([PROMPT])),
        engine.schedule,
        2,
        frames,
        lambda f, k: frame_noise([7], f, k, cfg),
        first=frame_from_image(image.pixels, cfg.size)[None],
    )
    ref_px = to_pixels(ref[0])
    assert got.shape == (frames, cfg.size, cfg.size, 3)
    np.testing.assert_array_equal(got, ref_px)
    assert len({f.tobytes() for f in got}) > frames // 2  # the stream moves


def test_batched_sessions_at_different_steps_and_frames_match_each_alone(engine: VideoEngine) -> None:
    frames = engine.cfg.sink + engine.cfg.window + 2
    specs = [(PROMPT, frames, 1, 1), (OTHER, frames - 3, 4, 2), (PROMPT, frames, 3, 3)]
    alone = [_alone(engine, *spec) for spec in specs]
    a = _open(engine, *specs[0])
    b = _open(engine, *specs[1])
    out_a: list[np.ndarray] = []
    for _ in range(5):  # a runs ahead: the others join mid-stream, at other frames and steps
        out_a += [f.pixels for f in engine.advance([a])]
    c = _open(engine, *specs[2])
    rest = _run(engine, [a, b, c])
    _same(np.stack(out_a + rest[id(a)]), alone[0])
    _same(np.stack(rest[id(b)]), alone[1])
    _same(np.stack(rest[id(c)]), alone[2])
    assert not np.array_equal(alone[0], alone[2][: len(alone[0])])  # different steps and seeds differ


def test_capacity_is_enforced_and_a_closed_row_is_clean_for_the_next_session(engine: VideoEngine) -> None:
    reference = _alone(engine, OTHER, 4, 2, 5)
    held = [_open(engine, PROMPT, 50, 1, i) for i in range(engine.capacity)]
    with pytest.raises(Overloaded, match="video_max_sessions"):
        _open(engine, PROMPT, 4, 2, 0)
    for _ in range(6):
        engine.advance(held)  # fill their caches
    engine.end(held[1])
    assert engine.active == engine.capacity - 1
    again = _open(engine, OTHER, 4, 2, 5)  # takes the freed row, which must start empty
    assert again.state.row == held[1].state.row
    _same(np.stack(_run(engine, [again])[id(again)]), reference)
    assert engine.advance([held[1]]) == []  # a closed session is never advanced
    for s in held:
        engine.end(s)
    assert engine.active == 0


def test_steps_outside_the_schedule_are_refused(engine: VideoEngine) -> None:
    with pytest.raises(InvalidRequest, match=r"`steps` must be between 1 and 4\. Given: 5"):
        _open(engine, PROMPT, 4, 5, 0)
    with pytest.raises(InvalidRequest, match=r"`frames` must be between 1 and 16\. Given: 17"):
        engine.spec.validate(StreamRequest(PROMPT, 17, 2, 0), max_frames=16)


def test_a_new_prompt_steers_the_following_frames_only(engine: VideoEngine) -> None:
    frames = 10
    plain = _alone(engine, PROMPT, frames, 2, 9)
    s = _open(engine, PROMPT, frames, 2, 9)
    got: list[np.ndarray] = []
    while len(got) < 4:
        got += [f.pixels for f in engine.advance([s])]
    engine.advance([s])  # half-way through frame 4 (2 steps per frame)
    engine.steer(s, OTHER)
    rest = _run(engine, [s])[id(s)]
    steered = np.stack(got + rest)
    np.testing.assert_array_equal(steered[:5], plain[:5])  # the frame in progress keeps its prompt
    assert not np.array_equal(steered[5:], plain[5:])
    assert s.prompt == OTHER


@pytest.mark.slow  # the video student's ONNX export (once per session)
def test_onnx_graphs_make_the_same_stream_as_torch(  # type: ignore[no-untyped-def]
    tmp_path: Path, video_exported: Path, video_student: Path, encoder
) -> None:
    from fewstep.artifacts.video import ARTIFACT
    from fewstep.evaluation.metrics import psnr

    folder = tmp_path / "shapes-video"
    shutil.copytree(video_exported, folder)  # a private copy: this test breaks one of its graphs
    art = json.loads((folder / ARTIFACT).read_text())
    assert all(v is None or v >= 45.0 for v in art["parity"]["by_steps"].values())
    torch_engine = VideoEngine(folder, encoder, capacity=2, first_frame=_image(video_student, encoder))
    onnx_engine = VideoEngine(
        folder, encoder, capacity=2, backend="onnxruntime", first_frame=_image(video_student, encoder)
    )
    torch_engine.load()
    onnx_engine.load()
    frames = torch_engine.cfg.sink + torch_engine.cfg.window + 3
    for steps in (1, 4):
        a = _alone(torch_engine, PROMPT, frames, steps, 3)
        b = _alone(onnx_engine, PROMPT, frames, steps, 3)
        assert psnr(a, b) >= 45.0
    # A graph that no longer matches its recorded hash is refused.
    (folder / "video.denoise.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        VideoEngine(
            folder, encoder, capacity=1, backend="onnxruntime", first_frame=_image(video_student, encoder)
        ).load()
    assert (folder / ARTIFACT).is_file()


def test_hybrid_takes_the_first_frame_from_the_image_hybrid(video_student: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    e = VideoEngine(video_student, encoder, capacity=3, first_frame=_image(video_student, encoder))
    e.load()
    assert e.spec.hybrid is True
    frames = 6
    plain = _alone(e, PROMPT, frames, 2, 4)
    hybrid = np.stack(_run(e, [h := _open(e, PROMPT, frames, 2, 4, hybrid=True)])[id(h)])
    again = np.stack(_run(e, [h2 := _open(e, PROMPT, frames, 2, 4, hybrid=True)])[id(h2)])
    np.testing.assert_array_equal(hybrid, again)  # seeded, like every stream
    assert not np.array_equal(hybrid[0], plain[0])  # the image teacher's first step changed the first frame
    assert e.first_frame is not None
    (image,) = e.first_frame.run([ImageItem(PROMPT, seed=4, steps=2, hybrid=True)])
    assert not isinstance(image, Exception)
    expected = to_pixels(frame_from_image(image.pixels, e.cfg.size)[None])[0]
    np.testing.assert_array_equal(hybrid[0], expected)
    # Batched with plain sessions at other frames, a hybrid stream is the same as alone.
    a = _open(e, OTHER, frames, 3, 1)
    e.advance([a])
    b = _open(e, PROMPT, frames, 2, 4, hybrid=True)
    got = _run(e, [a, b])
    _same(np.stack(got[id(b)]), hybrid)
    with pytest.raises(InvalidRequest, match="at least 2 with `hybrid`"):
        _open(e, PROMPT, frames, 1, 0, hybrid=True)
    no_teacher = VideoEngine(video_student, encoder, capacity=1, first_frame=_image(video_student, encoder, False))
    no_teacher.load()
    with pytest.raises(InvalidRequest, match="needs the image teacher"):
        _open(no_teacher, PROMPT, frames, 2, 0, hybrid=True)


def test_the_first_frame_model_must_be_the_one_the_manifest_names(
    tmp_path: Path,
    video_student: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(CheckpointError, match="first-frame image model 'shapes' is missing"):
        VideoEngine(video_student, encoder, capacity=1)
    wrong = ImageEngine(checkpoints / "shapes", encoder)
    wrong.manifest = {**wrong.manifest, "files": {"model.safetensors": {"sha256": "0" * 64}}}
    with pytest.raises(CheckpointError, match="not the one its manifest names"):
        VideoEngine(video_student, encoder, capacity=1, first_frame=wrong)


def test_a_student_that_names_no_image_model_draws_frame_0_itself(tmp_path: Path, video_student: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "shapes-video"
    shutil.copytree(video_student, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["first_frame"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    e = VideoEngine(folder, encoder, capacity=1)
    e.load()
    assert e.spec.first_frame is None and e.spec.hybrid is False
    got = _alone(e, PROMPT, 3, 1, 2)
    net, cfg = e.net, e.cfg
    ref = student_stream(
        net, net.text_kv(*encoder.encode([PROMPT])), e.schedule, 1, 3, lambda f, k: frame_noise([2], f, k, cfg)
    )
    np.testing.assert_array_equal(got, to_pixels(ref[0]))
