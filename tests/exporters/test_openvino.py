"""`fewstep export --openvino`: each model kind's graphs within the parity bar of torch, INT8 by NNCF calibrated
at every step count and gated as ONNX Runtime's INT8 is, and nothing left behind by a failed export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fewstep.artifacts.openvino import ROOT, describe
from fewstep.errors import CheckpointError
from fewstep.exporters import openvino as exporter
from fewstep.models.checkpoint import read_manifest
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # exports and quantizes the shipped student, a video student and a pipeline


def _worst(parity: dict) -> float:
    return min(float("inf") if v is None else v for v in parity["by_steps"].values())


def test_the_students_graphs_are_within_45_db_of_torch_and_its_int8_passes_the_onnx_gate(
    openvino_exported: Registry,
) -> None:
    folder = openvino_exported.version_dir("shapes", "1")
    steps = {str(n) for n in read_manifest(folder)["schedule"]["timesteps"]}
    fp32 = describe(folder, "fp32")
    assert set(fp32["parity"]["by_steps"]) == steps and _worst(fp32["parity"]) >= 45.0
    int8 = describe(folder, "int8")
    assert int8["gate"]["passed"] and int8["quantized"] == ["denoiser"] and int8["calibration"]["step_aware"]
    assert set(int8["quality"]["by_steps"]) == steps
    for row in int8["quality"]["by_steps"].values():  # the same rule as ONNX Runtime's INT8 (exporters/quantize.py)
        assert row["joint"] >= row["joint_fp32"] - 0.02 and row["frechet"] <= row["frechet_fp32"] * 1.25
    teacher = describe(openvino_exported.version_dir("shapes-teacher", "1"), "int8")
    assert teacher["gate"]["passed"], teacher["quality"]


def test_a_pipelines_graphs_are_within_40_db_and_its_int8_unet_is_gated(latent_exported: Path) -> None:
    fp32 = describe(latent_exported, "fp32")
    assert set(fp32["graphs"]) == {"text", "unet", "vae_decoder"} and _worst(fp32["parity"]) >= 40.0
    int8 = describe(latent_exported, "int8")
    assert int8["quantized"] == ["unet"] and int8["gate"]["passed"], int8["quality"]
    assert min(int8["quality"]["psnr_db_vs_fp32_by_steps"].values()) >= 25.0
    assert int8["calibration"]["unet_calls"] > 0 and int8["calibration"]["step_aware"]


def test_the_video_students_graphs_are_exported_by_the_command(video_exported: Path) -> None:
    printed = (video_exported.parent.parent.parent / "export.out").read_text()
    assert "→ openvino/fp32, parity" in printed
    art = describe(video_exported, "fp32")
    assert set(art["graphs"]) == {"text", "denoise", "keys_values"} and _worst(art["parity"]) >= 45.0
    with pytest.raises(CheckpointError):
        describe(video_exported, "int8")  # video stays FP32, as on ONNX Runtime


def test_a_failed_parity_check_leaves_nothing(
    exported: Registry, tmp_path: Path, encoder: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(exported.version_dir("shapes", "1"), tmp_path / "1"))
    shutil.rmtree(folder / ROOT, ignore_errors=True)

    def fail(*_: object) -> dict:
        raise CheckpointError("OpenVINO parity failed: PSNR 12.0 dB < 45.0 dB")

    monkeypatch.setattr(exporter, "_parity", fail)
    with pytest.raises(CheckpointError, match="parity failed"):
        exporter.export_openvino(folder, encoder, ("fp32",))  # type: ignore[arg-type]
    assert [p.name for p in (folder / ROOT).iterdir()] == []  # no artifact, no scratch folder


def test_unknown_precisions_and_missing_encoders_are_refused(exported: Registry) -> None:
    folder = exported.version_dir("shapes", "1")
    with pytest.raises(ValueError, match="fp8"):
        exporter.export_openvino(folder, None, ("fp32", "fp8"))
    with pytest.raises(ValueError, match="text encoder"):
        exporter.export_openvino(folder, None, ("fp32",))
    assert json.loads((folder / "manifest.json").read_text())["kind"] == "image"
