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


@pytest.mark.slow  # exports the video student
def test_export_of_a_video_student_writes_its_three_graphs(
    tmp_path: Path, video_student: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = str(tmp_path / "reg")
    assert main(["push", str(video_student), "--registry", reg]) == 0
    assert main(["export", "shapes-video", "--registry", reg, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "video.denoise.onnx" in out and "psnr_db_vs_torch" in out
    folder = Registry(tmp_path / "reg").version_dir("shapes-video", "1")
    assert all((folder / f"video.{g}.onnx").is_file() for g in ("text", "denoise", "keys_values"))
