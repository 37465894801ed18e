"""`fewstep train video`: the video judge, the causal teacher, and the few-step causal students.

Stages: `judge` (the frame classifier, `video_judge`), `teacher` (`video_teacher`), `forcing` (the
teacher-forcing student, kept as the ablation), `self-forcing` and `long-rollouts` (the served student,
`video_students`), `evaluate` (`video_eval`: 256-frame streams, drift, the model card).

Data are procedural clips (`evaluation.clips`), 16×16 by default. At 32×32 a frame is four times as
many tokens, and the attention over a clip grows with the square of that. The self-forcing stage
rolls the student out on its own outputs for every training step, and on 2 CPU cores that
budget decides the size.

**Image to video.** Every stream's frame 0 is drawn by the image student (named by sha256 in the video
manifests' `first_frame`), so the video models learn frames 1 on only: at 16×16 no network learned to
draw the shapes from scratch in this budget, while the image student draws them in one step
(docs/decisions/video-quality.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.errors import CheckpointError
from fewstep.evaluation.classifier import ARCHITECTURE
from fewstep.evaluation.motion import score_streams
from fewstep.models.checkpoint import MANIFEST, read_manifest, reference, save_checkpoint
from fewstep.models.schedules import default_student_schedule
from fewstep.models.text import TextEncoder, encoder_meta
from fewstep.models.video import load_video_net
from fewstep.trainer import video_judge
from fewstep.trainer.plots import save_curves
from fewstep.trainer.stages import (
    FORCING_ONLY_DIR,
    STUDENT_DIR,
    VIDEO_EVALUATION,
    VIDEO_JUDGE_DIR,
    VIDEO_STAGES,
    VIDEO_STUDENT_DIR,
    VIDEO_TEACHER_DIR,
    VideoRecipe,
)
from fewstep.trainer.video_eval import stage_evaluate
from fewstep.trainer.video_students import train_long_rollouts, train_student
from fewstep.trainer.video_teacher import train_teacher


def stage_judge(r: VideoRecipe, out: Path) -> None:
    t0 = time.time()
    model = video_judge.train_frame_classifier(r.seed, r.judge_steps, r.size)
    videos, targets = video_judge.real_streams(r.seed + 1, 256, 32, r.size)
    scores = score_streams(model, videos, targets)
    save_checkpoint(
        out / VIDEO_JUDGE_DIR,
        model.state_dict(),
        {
            "name": VIDEO_JUDGE_DIR,
            "version": "1",
            "kind": "classifier",
            "architecture": {"class": ARCHITECTURE, "input": f"{r.size}x{r.size}"},
            "metrics": {"real_clips": scores.window(0, 32), "real_clips_n": 256},
            "trainer": {"steps": r.judge_steps, "seed": r.seed, "seconds": round(time.time() - t0, 1)},
        },
    )


def stage_teacher(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    t0 = time.time()
    net, losses = train_teacher(r, encoder)
    save_curves({"flow matching": losses}, docs / "video_teacher_loss.png", "video teacher")
    save_checkpoint(
        out / VIDEO_TEACHER_DIR,
        net.state_dict(),
        {
            "name": VIDEO_TEACHER_DIR,
            "version": "1",
            "kind": "video-teacher",
            "architecture": {"class": "VideoDenoiser", "config": r.config().to_dict()},
            "text_encoder": encoder_meta(),
            "native_size": f"{r.size}x{r.size}",
            "sampler": {"steps": r.sampler_steps, "guidance": r.guidance},
            "trainer": {
                "recipe": asdict(r),
                "seconds": round(time.time() - t0, 1),
                "final_loss": float(np.mean(losses[-20:])),
            },
        },
    )


def _student_manifest(r: VideoRecipe, name: str, kind: str, first_frame: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """`first_frame`: the image student that draws every stream's frame 0 (`engines.video`)."""
    schedule = replace(default_student_schedule(), default_steps=r.default_steps)
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "architecture": {"class": "VideoDenoiser", "config": r.config().to_dict()},
        "text_encoder": encoder_meta(),
        "native_size": f"{r.size}x{r.size}",
        "schedule": schedule.to_dict(),
        "first_frame": reference(first_frame),
        "evaluation": VIDEO_EVALUATION,
        "trainer": {"recipe": asdict(r), **extra},
    }


def stage_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The teacher-forcing student, a new network: kept as the model card's ablation."""
    t0 = time.time()
    forced, losses = train_student(r, encoder, None, r.forcing_steps, "teacher-forcing")
    extra = {"teacher_forcing": {"steps": r.forcing_steps, "seconds": round(time.time() - t0, 1)}}
    manifest = _student_manifest(r, FORCING_ONLY_DIR, "video-ablation", out / STUDENT_DIR, extra)
    save_checkpoint(out / FORCING_ONLY_DIR, forced.state_dict(), manifest)
    save_curves({"teacher forcing": losses}, docs / "video_forcing_loss.png", "video student, teacher forcing")


def stage_self_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The served student: self-forcing from the teacher-forcing student."""
    forced = load_video_net(out / FORCING_ONLY_DIR)
    t0 = time.time()
    student, losses = train_student(r, encoder, forced, r.self_forcing_steps, "self-forcing")
    extra = dict(read_manifest(out / FORCING_ONLY_DIR)["trainer"])
    extra.pop("recipe", None)
    extra["self_forcing"] = {"steps": r.self_forcing_steps, "seconds": round(time.time() - t0, 1)}
    manifest = _student_manifest(r, VIDEO_STUDENT_DIR, "video", out / STUDENT_DIR, extra)
    save_checkpoint(out / VIDEO_STUDENT_DIR, student.state_dict(), manifest)
    save_curves({"self-forcing": losses}, docs / "video_self_forcing_loss.png", "video student, self-forcing")


def stage_long_rollouts(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The served student, continued on long rollouts. It continues the `self-forcing` stage's student
    once: a student that already had this stage is refused (run `self-forcing` first)."""
    trainer = read_manifest(out / VIDEO_STUDENT_DIR)["trainer"]
    if "long_rollouts" in trainer:
        raise CheckpointError(
            f"{out / VIDEO_STUDENT_DIR} already had the long-rollouts stage: run the `self-forcing` stage first"
        )
    t0 = time.time()
    student, losses = train_long_rollouts(r, encoder, load_video_net(out / VIDEO_STUDENT_DIR))
    extra = {k: v for k, v in trainer.items() if k != "recipe"}
    extra["long_rollouts"] = {"steps": r.long_steps, "seconds": round(time.time() - t0, 1)}
    manifest = _student_manifest(r, VIDEO_STUDENT_DIR, "video", out / STUDENT_DIR, extra)
    save_checkpoint(out / VIDEO_STUDENT_DIR, student.state_dict(), manifest)
    save_curves({"long rollouts": losses}, docs / "video_long_rollouts_loss.png", "video student, long rollouts")


def run(stages: list[str], out: Path, docs: Path, recipe: VideoRecipe, threads: int) -> None:
    unknown = [s for s in stages if s not in VIDEO_STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from {VIDEO_STAGES}")
    needs_image = {"forcing", "self-forcing", "long-rollouts", "evaluate"} & set(stages)
    if needs_image and not (out / STUDENT_DIR / MANIFEST).is_file():
        raise CheckpointError(
            f"stage {sorted(needs_image)[0]!r} needs the image student that draws every stream's first frame "
            f"({out / STUDENT_DIR}): run `fewstep train image` first"
        )
    torch.set_num_threads(threads)
    encoder = TextEncoder()
    for stage in stages:
        print(f"[train video] stage {stage}", flush=True)
        t0 = time.time()
        if stage == "judge":
            stage_judge(recipe, out)
        elif stage == "teacher":
            stage_teacher(recipe, out, docs, encoder)
        elif stage == "forcing":
            stage_forcing(recipe, out, docs, encoder)
        elif stage == "self-forcing":
            stage_self_forcing(recipe, out, docs, encoder)
        elif stage == "long-rollouts":
            stage_long_rollouts(recipe, out, docs, encoder)
        else:
            stage_evaluate(recipe, out, docs, encoder)
        print(f"[train video] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
