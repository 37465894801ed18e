import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.cli import main, parser
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.registry import Registry

COMMANDS = ["serve", "worker", "train", "trainer", "import", "export", "push", "rollback"]


def test_every_subcommand_has_help_and_no_other_is_offered(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: fewstep {command}" in capsys.readouterr().out
    offered = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sorted(offered) == sorted(COMMANDS)
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" not in r.stdout


def test_the_import_help_names_every_family(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.models.causal_families import CAUSAL_FAMILIES
    from fewstep.models.families import FAMILIES

    with pytest.raises(SystemExit):
        main(["import", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert [f for f in [*FAMILIES, *CAUSAL_FAMILIES] if f not in shown] == []


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fewstep {version('fewstep')}"


def test_push_then_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, folder in enumerate(("a", "b")):
        save_checkpoint(
            tmp_path / folder, {"w": torch.full((2,), float(i))}, {"name": "demo", "version": "1", "kind": "image"}
        )
    reg = str(tmp_path / "reg")
    assert main(["push", str(tmp_path / "a"), "--registry", reg]) == 0
    assert main(["push", str(tmp_path / "b"), "--registry", reg, "--no-promote"]) == 0
    assert "published demo:2 (promoted: 1;" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "b"), "--registry", reg]) == 0  # the default promotes
    assert "published demo:3 (promoted: 3;" in capsys.readouterr().out
    assert main(["rollback", "demo", "--registry", reg]) == 0
    assert Registry(tmp_path / "reg").promoted("demo") == "2"
    assert main(["push", str(tmp_path / "a"), "--registry", reg, "--model", "../x"]) == 1
    assert "invalid model name" in capsys.readouterr().err


@pytest.mark.slow  # exports the video student (the session's `video_exported`, made by these commands)
def test_export_of_a_video_student_writes_its_three_graphs(video_exported: Path) -> None:
    # `video_exported` ran `fewstep push` and `fewstep export` into a fresh registry: one export per session.
    out = (video_exported.parents[2] / "export.out").read_text()
    assert "video.denoise.onnx" in out and "psnr_db_vs_torch" in out
    assert all((video_exported / f"video.{g}.onnx").is_file() for g in ("text", "denoise", "keys_values"))


@pytest.mark.slow  # exports two pipelines
def test_import_then_export_of_a_hybrid_pair_serves_it_on_onnxruntime_and_openvino(
    tmp_path: Path, tiny_pipelines: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fewstep.engines.base import ImageItem, ImageResult
    from fewstep.engines.latent import LatentEngine
    from fewstep.evaluation.metrics import psnr

    reg = str(tmp_path / "reg")
    sdxl = str(tiny_pipelines["sdxl"])
    assert main(["import", sdxl, "--name", "base", "--family", "base", "--registry", reg]) == 0
    student = ["import", sdxl, "--name", "student", "--family", "dmd2", "--teacher", "base", "--teacher-guidance", "3"]
    assert main([*student, "--registry", reg]) == 0
    export = ["export", "student", "--registry", reg, "--precisions", "fp32,int8", "--threads", "1", "--openvino"]
    assert main(export) == 0
    out = capsys.readouterr().out
    for name in ("student", "base"):
        for where in ("onnx/fp32", "onnx/int8", "openvino/fp32", "openvino/int8"):
            assert f"{name}:1 → {where}" in out, (name, where)
    registry = Registry(tmp_path / "reg")
    folder = registry.version_dir("student", "1")
    teacher = registry.named_dir(registry.manifest("student", "1"), "teacher")
    assert teacher is not None
    for art in (teacher / "onnx" / "int8" / "manifest.json", teacher / "openvino" / "int8" / "manifest.json"):
        # The base takes only a walk's first step: calibrated and gated there (it has no recipe to sample by).
        record = json.loads(art.read_text())
        assert record["calibration"]["first_step"] and record["calibration"]["unet_calls"] > 0
        err = record["quality"]["relative_rms_error_vs_fp32"]
        assert record["gate"]["passed"] == (err <= 0.1)
    items = [ImageItem(prompt, seed, 4, hybrid=True) for seed, prompt in enumerate(("a red circle", "a blue box"))]
    images = []
    for backend in ("torch", "onnxruntime", "openvino"):
        engine = LatentEngine(folder, backend, teacher_folder=teacher)
        engine.load()
        assert engine.spec.hybrid, engine.spec.hybrid_reason
        images.append(engine.run(items))
    for a, *others in zip(*images, strict=True):
        for b in others:
            assert isinstance(a, ImageResult) and isinstance(b, ImageResult), (a, b)
            assert psnr(a.pixels, b.pixels) >= 40.0


def test_rollback_skips_what_the_models_own_kind_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A video model's verdicts are kept under its kind's runtime (`video-torch`), not the image backend's."""
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        folder = tmp_path / f"v{i}"
        save_checkpoint(folder, {"w": torch.full((2,), float(i))}, {"name": "clip", "version": "1", "kind": "video"})
        reg.publish(folder, promote=True)
    reg.record_verdict("clip", "2", "video-torch", {"passed": False, "reason": "drifts", "metrics": {}})
    assert main(["rollback", "clip", "--registry", str(tmp_path / "reg")]) == 0
    assert reg.promoted("clip") == "1"  # version 2 was refused by the video gate


def test_service_flags_go_to_the_settings_not_into_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from fewstep.cli import _settings

    monkeypatch.setenv("FEWSTEP_PORT", "8123")
    monkeypatch.delenv("FEWSTEP_HOST", raising=False)
    monkeypatch.delenv("FEWSTEP_THREADS", raising=False)
    settings = _settings(threads=3, host="0.0.0.0", port=None)
    assert (settings.threads, settings.host, settings.port) == (3, "0.0.0.0", 8123)  # unset flags: the env's
    assert "FEWSTEP_HOST" not in os.environ and "FEWSTEP_THREADS" not in os.environ
