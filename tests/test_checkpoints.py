"""The shipped reference models: verified, small, and as good as the model card says."""

import json
from pathlib import Path

from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.schedules import FewStepSchedule

SHIPPED = [
    "shapes",
    "shapes-classifier",
    "shapes-teacher",
    "shapes-video",
    "shapes-video-forcing-only",
    "shapes-video-judge",
    "shapes-video-teacher",
]


def test_every_shipped_checkpoint_verifies_each_under_8_mb_all_under_24_mb(checkpoints: Path) -> None:
    folders = sorted(p for p in checkpoints.iterdir() if (p / "manifest.json").is_file())
    assert [p.name for p in folders] == SHIPPED
    total = 0
    for folder in folders:
        manifest, state = load_checkpoint(folder)
        assert state
        size = sum(f["bytes"] for f in manifest["files"].values())
        assert size <= 8 * 1024 * 1024, folder.name
        total += size
    assert total <= 24 * 1024 * 1024


def test_student_serves_one_to_four_steps_and_records_its_teacher(checkpoints: Path) -> None:
    student = json.loads((checkpoints / "shapes" / "manifest.json").read_text())
    teacher = json.loads((checkpoints / "shapes-teacher" / "manifest.json").read_text())
    assert FewStepSchedule.from_dict(student["schedule"]).steps == [1, 2, 3, 4]
    assert student["teacher"]["sha256"] == teacher["files"]["model.safetensors"]["sha256"]
    assert student["architecture"] == teacher["architecture"]


def test_recorded_quality_meets_the_release_floors(checkpoints: Path) -> None:
    """The evaluate stage's numbers (docs/MODEL_CARD.md) against the floors a release must meet."""
    classifier = json.loads((checkpoints / "shapes-classifier" / "manifest.json").read_text())
    teacher = json.loads((checkpoints / "shapes-teacher" / "manifest.json").read_text())
    student = json.loads((checkpoints / "shapes" / "manifest.json").read_text())
    assert classifier["metrics"]["real"]["joint"] >= 0.95
    assert teacher["metrics"]["joint"] >= 0.85
    by_steps = student["metrics"]["by_steps"]
    assert by_steps["1"]["joint"] >= 0.75 * teacher["metrics"]["joint"]
    assert by_steps["4"]["joint"] >= 0.95 * teacher["metrics"]["joint"]


def test_the_self_forced_video_student_does_not_drift_over_256_frames(checkpoints: Path) -> None:
    """Issue 5's drift criterion on the evaluate stage's numbers: frames 241–256 within 10 points of 1–16."""
    judge = json.loads((checkpoints / "shapes-video-judge" / "manifest.json").read_text())
    assert judge["metrics"]["real_clips"]["joint"] >= 0.95
    student = json.loads((checkpoints / "shapes-video" / "manifest.json").read_text())
    ablation = json.loads((checkpoints / "shapes-video-forcing-only" / "manifest.json").read_text())
    default = FewStepSchedule.from_dict(student["schedule"]).default_steps

    def row(manifest: dict) -> dict:
        return next(r for r in manifest["metrics"]["streams"] if r["steps"] == default)

    sf, tf = row(student), row(ablation)
    for metric in ("joint", "motion"):
        assert sf["late"][metric] >= sf["early"][metric] - 0.10, metric
    # Self-forcing is what holds it: the teacher-forcing-only student loses more over the stream.
    assert tf["late"]["joint"] - tf["early"]["joint"] < sf["late"]["joint"] - sf["early"]["joint"]
