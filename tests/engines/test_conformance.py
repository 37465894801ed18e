"""One conformance suite per engine protocol, run against every engine and backend this machine has.

Step engines (`StepEngine`): the image engine on torch eager, ONNX Runtime (FP32, INT8 static QDQ, INT8
dynamic, FP8 QDQ emulated) and OpenVINO (FP32, INT8 by NNCF; TensorRT where a CUDA GPU and the `tensorrt`
package exist), the latent engine of an imported diffusers pipeline (torch; ONNX Runtime and OpenVINO, FP32
and INT8), and the no-op engine. Stream engines (`StreamEngine`): the video engine on torch, ONNX Runtime
and OpenVINO.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult, StepEngine, StreamEngine, StreamRequest, run_to_completion
from fewstep.engines.image import ImageEngine
from fewstep.engines.latent import LatentEngine
from fewstep.engines.noop import NoopEngine
from fewstep.engines.video import VideoEngine
from fewstep.errors import Cancelled, InvalidRequest, Overloaded
from fewstep.models.checkpoint import read_manifest

pytestmark = pytest.mark.slow  # the ONNX variants export and quantize the shipped student first

STEP_VARIANTS = [
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("onnxruntime", "int8-dynamic"),
    ("onnxruntime", "fp8"),
    ("openvino", "fp32"),
    ("openvino", "int8"),
    ("noop", "none"),
    ("latent-torch", "fp32"),
    ("latent-onnxruntime", "fp32"),
    ("latent-onnxruntime", "int8"),
    ("latent-openvino", "fp32"),
    ("latent-openvino", "int8"),
]
if torch.cuda.is_available() and importlib.util.find_spec("tensorrt"):
    STEP_VARIANTS += [("tensorrt", "fp16"), ("tensorrt", "int8"), ("tensorrt", "fp8")]


@pytest.fixture(scope="module", params=STEP_VARIANTS, ids=[f"{b}-{p}" for b, p in STEP_VARIANTS])
def engine(request: pytest.FixtureRequest, encoder) -> StepEngine:  # type: ignore[no-untyped-def]
    backend, precision = request.param
    e: StepEngine
    if backend == "noop":
        e = NoopEngine()
    elif backend.startswith("latent-"):
        folder = request.getfixturevalue("latent_exported")
        e = LatentEngine(folder, backend=backend.removeprefix("latent-"), precision=precision)
    else:
        quantized = request.getfixturevalue("openvino_exported" if backend == "openvino" else "quantized")
        e = ImageEngine(
            quantized.version_dir("shapes", "1"),
            encoder,
            backend=backend,
            precision=precision,
            teacher_folder=quantized.version_dir("shapes-teacher", "1"),
        )
    e.load()
    e.warmup()
    return e


def test_step_engine_protocol_and_spec(engine: StepEngine) -> None:
    assert isinstance(engine, StepEngine)
    assert engine.spec.steps == [1, 2, 3, 4] and engine.spec.default_steps in engine.spec.steps


def test_every_step_count_makes_an_image_of_the_spec_size_at_its_cost(engine: StepEngine) -> None:
    outs = run_to_completion(engine, [ImageItem("a blue circle", 1, n) for n in (1, 2, 3, 4)])
    for n, out in zip((1, 2, 3, 4), outs, strict=True):
        assert isinstance(out, ImageResult), out  # a non-finite output would come back as GenerationFailed
        assert out.pixels.shape == (engine.spec.height, engine.spec.width, 3) and out.pixels.dtype == np.uint8
        assert out.nfe == n and out.steps == n and out.version == engine.spec.version


def test_same_item_same_image_whatever_shares_its_batch(engine: StepEngine) -> None:
    me = ImageItem("a yellow square", 21, 3)
    (alone,) = run_to_completion(engine, [me])
    crowd = run_to_completion(engine, [ImageItem("a red cross", i, 1 + i % 4) for i in range(5)] + [me])[-1]
    assert isinstance(alone, ImageResult) and isinstance(crowd, ImageResult)
    assert np.abs(alone.pixels.astype(int) - crowd.pixels.astype(int)).max() <= 1
    (other,) = run_to_completion(engine, [ImageItem("a yellow square", 22, 3)])
    assert isinstance(other, ImageResult) and not np.array_equal(other.pixels, alone.pixels)  # the seed counts


def test_one_bad_item_never_fails_its_neighbours(engine: StepEngine) -> None:
    good, bad = run_to_completion(engine, [ImageItem("a red circle", 1, 2), ImageItem("a red circle", 1, 0)])
    assert isinstance(good, ImageResult) and isinstance(bad, InvalidRequest)


def test_a_stopped_item_leaves_at_the_next_step_boundary(engine: StepEngine) -> None:
    items = [ImageItem("a red circle", 1, 4), ImageItem("a red circle", 2, 2)]
    out = run_to_completion(engine, items, lambda k, active: [0] if k == 1 else [])
    assert isinstance(out[0], Cancelled) and str(out[0]) == "cancelled before step 2 of 4"
    assert isinstance(out[1], ImageResult)


STREAM_VARIANTS = ["torch", "onnxruntime", "openvino"]


@pytest.fixture(scope="module", params=STREAM_VARIANTS)
def streamer(request: pytest.FixtureRequest, video_student: Path, encoder) -> StreamEngine:  # type: ignore[no-untyped-def]
    folder = request.getfixturevalue("video_exported") if request.param != "torch" else video_student
    ref = read_manifest(video_student)["first_frame"]
    image = ImageEngine(
        video_student.parent / ref["name"], encoder, teacher_folder=video_student.parent / "shapes-teacher"
    )
    e = VideoEngine(folder, encoder, capacity=2, backend=request.param, first_frame=image)
    e.load()
    e.warmup()
    return e


def _stream(engine: StreamEngine, request: StreamRequest) -> np.ndarray:
    s = engine.open(request)
    frames = []
    try:
        while not s.finished:
            frames += [f.pixels for f in engine.advance([s])]
    finally:
        engine.end(s)
    return np.stack(frames)


def test_stream_engine_protocol_and_spec(streamer: StreamEngine) -> None:
    assert isinstance(streamer, StreamEngine)
    assert streamer.spec.steps == [1, 2, 3, 4] and streamer.capacity == 2 and streamer.active == 0


def test_a_stream_has_its_frames_in_order_and_is_seeded(streamer: StreamEngine) -> None:
    req = StreamRequest("a red circle moving left quickly", 5, 2, 3)
    a, b = _stream(streamer, req), _stream(streamer, req)
    assert a.shape == (5, streamer.spec.height, streamer.spec.width, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _stream(streamer, StreamRequest(req.prompt, 5, 2, 4)))


def test_capacity_is_enforced_and_an_ended_session_frees_its_place(streamer: StreamEngine) -> None:
    held = [streamer.open(StreamRequest("a blue square moving up slowly", 3, 1, i)) for i in range(2)]
    with pytest.raises(Overloaded):
        streamer.open(StreamRequest("a blue square moving up slowly", 3, 1, 9))
    streamer.end(held[0])
    assert streamer.active == 1 and streamer.advance([held[0]]) == []
    again = streamer.open(StreamRequest("a blue square moving up slowly", 3, 1, 9))
    for s in (held[1], again):
        streamer.end(s)
    assert streamer.active == 0


def test_bad_stream_requests_are_refused(streamer: StreamEngine) -> None:
    with pytest.raises(InvalidRequest, match="`steps`"):
        streamer.open(StreamRequest("a red circle moving left quickly", 3, 5, 0))
    with pytest.raises(InvalidRequest, match="`frames` must be between 1 and 8"):
        streamer.spec.validate(StreamRequest("a red circle moving left quickly", 9, 2, 0), max_frames=8)
