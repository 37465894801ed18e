"""One conformance suite, run against every backend and precision this machine has.

torch eager and ONNX Runtime everywhere (FP32, INT8 static QDQ, INT8 dynamic, FP8 QDQ emulated);
TensorRT joins where a CUDA GPU and the `tensorrt` package exist.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fewstep.engines.base import Engine, ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.errors import InvalidRequest

VARIANTS = [
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("onnxruntime", "int8-dynamic"),
    ("onnxruntime", "fp8"),
]
if torch.cuda.is_available() and importlib.util.find_spec("tensorrt"):
    VARIANTS += [("tensorrt", "fp16"), ("tensorrt", "int8"), ("tensorrt", "fp8")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{b}-{p}" for b, p in VARIANTS])
def engine(request: pytest.FixtureRequest, quantized, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    backend, precision = request.param
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


def test_protocol_and_info(engine: ImageEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.info.steps == [1, 2, 3, 4] and engine.health()["loaded"]


def test_every_step_count_gives_a_finite_image_of_the_native_size(engine: ImageEngine) -> None:
    outs = engine.run([ImageItem("a blue circle", 1, n) for n in (1, 2, 3, 4)])
    for n, out in zip((1, 2, 3, 4), outs, strict=True):
        assert isinstance(out, ImageResult) and out.pixels.shape == (32, 32, 3) and out.nfe == n


def test_same_item_same_image_whatever_shares_its_batch(engine: ImageEngine) -> None:
    me = ImageItem("a yellow square", 21, 3)
    alone = engine.run([me])[0]
    crowd = engine.run([ImageItem("a red cross", i, 1 + i % 4) for i in range(5)] + [me])[-1]
    assert isinstance(alone, ImageResult) and isinstance(crowd, ImageResult)
    assert np.abs(alone.pixels.astype(int) - crowd.pixels.astype(int)).max() <= 1


def test_one_bad_item_never_fails_its_neighbours(engine: ImageEngine) -> None:
    good, bad = engine.run([ImageItem("a red circle", 1, 2), ImageItem("a red circle", 1, 0)])
    assert isinstance(good, ImageResult) and isinstance(bad, InvalidRequest)
