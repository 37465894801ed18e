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
