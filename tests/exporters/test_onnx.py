"""ONNX export of the shipped models, parity with torch, and what the onnxruntime backend refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.errors import CheckpointError
from fewstep.exporters.onnx import MIN_PSNR_DB
from fewstep.models.checkpoint import sha256_file
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # exports the shipped models


def _copy(reg: Registry, tmp_path: Path) -> Path:
    dst = tmp_path / "shapes"
    shutil.copytree(reg.version_dir("shapes", "1"), dst)
    return dst


def test_export_writes_a_manifest_with_parity_at_every_step_count(exported: Registry) -> None:
    folder = exported.version_dir("shapes", "1")
    art = json.loads((folder / "model.fp32.onnx.json").read_text())
    assert art["sha256"] == sha256_file(folder / "model.fp32.onnx")
    assert (
        art["source"]["sha256"]
        == json.loads((folder / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
    )
    assert art["input_order"] == ["x", "t", "states", "mask"] and art["inputs"]["x"]["shape"][0] == "batch"
    assert set(art["parity"]["by_steps"]) == {"1", "2", "3", "4"}
    for db in art["parity"]["by_steps"].values():
        assert db is None or db >= MIN_PSNR_DB
    teacher = json.loads((exported.version_dir("shapes-teacher", "1") / "model.fp32.onnx.json").read_text())
    assert teacher["parity"]["value"] < 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_onnxruntime_engine_matches_torch_and_keeps_determinism(exported: Registry, encoder, steps: int) -> None:  # type: ignore[no-untyped-def]
    folder = exported.version_dir("shapes", "1")
    teacher = exported.version_dir("shapes-teacher", "1")
    ort_engine = ImageEngine(folder, encoder, backend="onnxruntime", teacher_folder=teacher)
    torch_engine = ImageEngine(folder, encoder, backend="torch", teacher_folder=teacher)
    ort_engine.load()
    torch_engine.load()
    items = [ImageItem("a red circle", 3, steps), ImageItem("a blue square", 4, steps, hybrid=steps > 1)]
    for a, b in zip(ort_engine.run(items), torch_engine.run(items), strict=True):
        assert isinstance(a, ImageResult) and isinstance(b, ImageResult)
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1
    alone = ort_engine.run(items[:1])[0]
    crowd = ort_engine.run([ImageItem(f"a green cross {i}", i, 1 + i % 4) for i in range(5)] + items[:1])[-1]
    assert isinstance(alone, ImageResult) and isinstance(crowd, ImageResult)
    assert np.abs(alone.pixels.astype(int) - crowd.pixels.astype(int)).max() <= 1


def test_corrupted_artifact_is_refused(exported: Registry, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = _copy(exported, tmp_path)
    data = bytearray((folder / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        ImageEngine(folder, encoder, backend="onnxruntime").load()


def test_artifact_from_other_weights_is_refused(exported: Registry, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = _copy(exported, tmp_path)
    art = json.loads((folder / "model.fp32.onnx.json").read_text())
    art["source"]["sha256"] = "0" * 64
    (folder / "model.fp32.onnx.json").write_text(json.dumps(art))
    with pytest.raises(CheckpointError, match="other weights"):
        ImageEngine(folder, encoder, backend="onnxruntime").load()


def _edit_graph(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the ONNX graph and re-hash it, as a buggy exporter would."""
    path = folder / "model.fp32.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    art = json.loads((folder / "model.fp32.onnx.json").read_text())
    art["sha256"], art["bytes"] = sha256_file(path), path.stat().st_size
    (folder / "model.fp32.onnx.json").write_text(json.dumps(art))


def test_wrong_input_names_are_refused(exported: Registry, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = _copy(exported, tmp_path)

    def rename(model: onnx.ModelProto) -> None:
        old = model.graph.input[3].name
        model.graph.input[3].name = "attention_mask"
        for node in model.graph.node:
            node.input[:] = ["attention_mask" if i == old else i for i in node.input]

    _edit_graph(folder, rename)
    with pytest.raises(CheckpointError, match="inputs/outputs"):
        ImageEngine(folder, encoder, backend="onnxruntime").load()


def test_nan_outputs_are_refused_at_warmup(exported: Registry, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = _copy(exported, tmp_path)

    def poison(model: onnx.ModelProto) -> None:
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:  # a conv kernel
                arr = onnx.numpy_helper.to_array(init).copy()
                arr[...] = np.nan
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
                return

    _edit_graph(folder, poison)
    engine = ImageEngine(folder, encoder, backend="onnxruntime")
    engine.load()
    with pytest.raises(CheckpointError, match="warm-up"):
        engine.warmup()
