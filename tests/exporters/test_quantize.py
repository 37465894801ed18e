"""INT8 / FP8 quantization: step-aware calibration, the quality gate, and serving what passed it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fewstep.artifacts.onnx import describe
from fewstep.engines.backends import backend
from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.evaluation.classifier import load_classifier
from fewstep.evaluation.judges import AttributeJudge
from fewstep.exporters.quantize import GATE_POINTS, calibration_feeds, quantize
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # exports and quantizes the shipped models


@pytest.fixture(scope="module")
def judge(checkpoints: Path):  # type: ignore[no-untyped-def]
    return AttributeJudge(load_classifier(checkpoints / "shapes-classifier"))


def test_calibration_covers_every_timestep_of_every_schedule(exported: Registry, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = exported.version_dir("shapes", "1")
    feeds = calibration_feeds(folder, json.loads((folder / "manifest.json").read_text()), encoder, 1)
    seen = {round(float(t), 4) for f in feeds for t in f["t"]}
    assert seen == {1.0, 0.75, 0.6667, 0.5, 0.3333, 0.25}
    assert len(feeds) == 1 + 2 + 3 + 4


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int8-dynamic", "fp8"])
def test_quantized_student_stays_within_two_points_and_serves(
    quantized: Registry,
    encoder,  # type: ignore[no-untyped-def]
    precision: str,
) -> None:
    folder = quantized.version_dir("shapes", "1")
    art = describe(folder, precision)
    assert art["quality"]["images"] == 40  # the fixture's gate_seeds=1
    for row in art["quality"]["by_steps"].values():  # the continuous signal, beside the saturated accuracy
        assert row["frechet"] <= 1.25 * row["frechet_fp32"]
    assert art["gate"]["passed"], art
    assert art["derived_from"]["artifact"] == "model.fp32.onnx" and art["calibration"]["step_aware"]
    for row in art["quality"]["by_steps"].values():
        assert row["joint"] >= row["joint_fp32"] - GATE_POINTS
    engine = ImageEngine(folder, encoder, backend="onnxruntime", precision=precision)
    engine.load()
    engine.warmup()
    me = ImageItem("a green triangle", 11, 2)
    alone = engine.run([me])[0]
    crowd = engine.run([ImageItem("a red cross", i, 1 + i % 4) for i in range(4)] + [me])[-1]
    assert isinstance(alone, ImageResult) and isinstance(crowd, ImageResult)
    assert np.abs(alone.pixels.astype(int) - crowd.pixels.astype(int)).max() <= 1


def test_an_artifact_that_failed_its_gate_is_refused_and_a_refused_teacher_only_disables_hybrid(
    exported: Registry,
    tmp_path: Path,
    encoder,
    judge,  # type: ignore[no-untyped-def]
) -> None:
    student, teacher = tmp_path / "shapes", tmp_path / "teacher"
    shutil.copytree(exported.version_dir("shapes", "1"), student)
    shutil.copytree(exported.version_dir("shapes-teacher", "1"), teacher)
    quantize(student, ["int8-dynamic"], encoder, judge, gate_seeds=1)
    quantize(teacher, ["int8-dynamic"], encoder)
    meta = teacher / "model.int8-dynamic.onnx.json"
    art = json.loads(meta.read_text())
    art["gate"] = {"passed": False, "rule": "test"}
    meta.write_text(json.dumps(art))
    with pytest.raises(CheckpointError, match="quality gate"):
        backend("onnxruntime").image(teacher, json.loads((teacher / "manifest.json").read_text()), "int8-dynamic")

    engine = ImageEngine(student, encoder, backend="onnxruntime", precision="int8-dynamic", teacher_folder=teacher)
    engine.load()
    assert engine.spec.hybrid is False
    plain, hybrid = engine.run([ImageItem("a red circle", 1, 2), ImageItem("a red circle", 1, 2, hybrid=True)])
    assert isinstance(plain, ImageResult)
    assert isinstance(hybrid, InvalidRequest) and "quality gate" in str(hybrid)
