"""`fewstep train video --quick`: every stage runs, and each checkpoint loads and streams through its cache."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.registry import Registry
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.video import VideoDenoiser
from fewstep.models.video_cache import VideoConfig
from fewstep.trainer.stages import FORCING_ONLY_DIR, VIDEO_JUDGE_DIR, VIDEO_STUDENT_DIR, VIDEO_TEACHER_DIR
from fewstep.trainer.stages import STUDENT_DIR as IMAGE_STUDENT_DIR
from fewstep.trainer.video_teacher import sample_stream

pytestmark = pytest.mark.slow  # trains every stage (quick recipes)
JUDGE_DIR, STUDENT_DIR, TEACHER_DIR = VIDEO_JUDGE_DIR, VIDEO_STUDENT_DIR, VIDEO_TEACHER_DIR


def test_quick_run_writes_every_checkpoint_and_the_card_section(  # type: ignore[no-untyped-def]
    tmp_path: Path, checkpoints: Path, encoder, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs).mkdir()
    (docs / "MODEL_CARD.md").write_text("# card\n\n<!-- image-eval -->\nimage rows\n<!-- /image-eval -->\n")
    argv = ["train", "video", "--quick", "--out", str(tmp_path), "--docs", str(docs), "--threads", "1"]
    assert main(argv) == 1  # the students continue the image student's first frame: it must exist
    assert "run `fewstep train image` first" in capsys.readouterr().err
    assert not (tmp_path / JUDGE_DIR).exists()  # refused before any stage ran
    shutil.copytree(checkpoints / IMAGE_STUDENT_DIR, tmp_path / IMAGE_STUDENT_DIR)
    registry = Registry(tmp_path / "registry")
    registry.publish(tmp_path / IMAGE_STUDENT_DIR)  # already held: --push must not publish it again
    assert main([*argv, "--push", "--registry", str(registry.root)]) == 0
    assert registry.versions(IMAGE_STUDENT_DIR) == ["1"]
    assert registry.promoted(STUDENT_DIR) == "1" and registry.promoted(TEACHER_DIR) == "1"
    assert registry.named_dir(registry.manifest(STUDENT_DIR, "1"), "first_frame") == registry.version_dir(
        IMAGE_STUDENT_DIR, "1"
    )
    image_sha = load_checkpoint(tmp_path / IMAGE_STUDENT_DIR)[0]["files"]["model.safetensors"]["sha256"]
    for folder, kind in ((STUDENT_DIR, "video"), (FORCING_ONLY_DIR, "video-ablation")):
        manifest, _ = load_checkpoint(tmp_path / folder)
        assert manifest["kind"] == kind and manifest["first_frame"]["sha256"] == image_sha
        assert FewStepSchedule.from_dict(manifest["schedule"]).steps == [1, 2, 3, 4]
        rows = manifest["metrics"]["streams"]
        assert [r["steps"] for r in rows] == [1, 2, 3, 4]
        for r in rows:  # a joint accuracy cannot be above either of its parts
            for window in ("early", "late"):
                w = r[window]
                assert w["joint"] <= min(w["shape"], w["colour"]) and set(w) == {"shape", "colour", "joint", "motion"}
    check = load_checkpoint(tmp_path / STUDENT_DIR)[0]["metrics"]["drift_check"]  # the served student, more streams
    assert (check["streams"], check["steps"], check["frames"]) == (3, 2, 20) and math.isfinite(check["late_joint_se"])
    assert "drift_check" not in load_checkpoint(tmp_path / FORCING_ONLY_DIR)[0]["metrics"]
    assert load_checkpoint(tmp_path / JUDGE_DIR)[0]["metrics"]["real_clips"]["colour"] > 0.0
    card = (docs / "MODEL_CARD.md").read_text()
    assert "image rows" in card  # the image section is left alone
    served = next(r for r in load_checkpoint(tmp_path / STUDENT_DIR)[0]["metrics"]["streams"] if r["steps"] == 4)
    row = next(line for line in card.splitlines() if line.startswith("| self-forcing | 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]  # model, steps, NFE, frame 1, 1–16 shape … joint
    assert cells[2] == "4" and cells[6] == f"{served['early']['joint']:.3f}"  # the card shows what was recorded
    continued = card.split("**Continuing a real first frame.**")[1]  # every model given the real frame 0
    for model in ("self-forcing | 2 |", "teacher forcing only | 2 |", "teacher | 2 |"):
        assert f"| {model}" in continued, model
    pngs = ("video_filmstrip.png", "video_drift.png", "video_teacher_loss.png", "video_forcing_loss.png")
    for png in (*pngs, "video_self_forcing_loss.png", "video_long_rollouts_loss.png"):
        assert (docs / png).stat().st_size > 0
    trainer = load_checkpoint(tmp_path / STUDENT_DIR)[0]["trainer"]
    assert trainer["self_forcing"]["steps"] == 2 and trainer["long_rollouts"]["steps"] == 2
    # The long-rollouts stage continues the self-forcing student once, never its own output.
    assert main(["train", "video", "--quick", "--stages", "long-rollouts", "--out", str(tmp_path)]) == 1
    assert "already had the long-rollouts stage" in capsys.readouterr().err


def test_quick_teacher_streams_through_its_cache(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    argv = ["train", "video", "--quick", "--stages", "teacher", "--out", str(tmp_path), "--docs", str(tmp_path)]
    assert main([*argv, "--threads", "1"]) == 0
    manifest, state = load_checkpoint(tmp_path / TEACHER_DIR)
    assert manifest["kind"] == "video-teacher" and manifest["native_size"] == "16x16"
    assert np.isfinite(manifest["trainer"]["final_loss"])
    cfg = VideoConfig(**manifest["architecture"]["config"])
    net = VideoDenoiser(cfg)
    net.load_state_dict(state)  # strict: the manifest's architecture is the one trained
    text = net.text_kv(*encoder.encode(["a red circle moving left quickly"] * 2))
    null = net.text_kv(*encoder.encode([""] * 2))
    frames = cfg.sink + cfg.window + 3  # past the window
    video = sample_stream(net.eval(), text, null, frames, seeds=[1, 2], steps=2, guidance=3.0)
    assert video.shape == (2, frames, 3, 16, 16) and np.isfinite(video).all()
    again = sample_stream(net, text, null, frames, seeds=[1, 2], steps=2, guidance=3.0)
    assert np.array_equal(video, again)  # seeded: the same stream every time
    assert not torch.equal(torch.from_numpy(video[0]), torch.from_numpy(video[1]))
    first = torch.from_numpy(video[:, 0]).flip(0)  # each stream continues the other's first frame
    continued = sample_stream(net, text, null, frames, seeds=[1, 2], steps=2, guidance=3.0, first=first)
    assert np.array_equal(continued[:, 0], first.numpy()) and not np.array_equal(continued[:, 1:], video[:, 1:])
