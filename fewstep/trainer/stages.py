"""What every training stage is given: checkpoint folder names, stage lists and recipes.

The stages of `fewstep train image` and `fewstep train video` import this module and nothing of each
other, so a stage can be re-run alone (`--stages`) and no two stage modules import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fewstep.models.video_cache import VideoConfig

IMAGE_STAGES = ("classifier", "teacher", "student", "evaluate")
CLASSIFIER_DIR, TEACHER_DIR, STUDENT_DIR = "shapes-classifier", "shapes-teacher", "shapes"
ABLATION_DIR = "shapes-regression-only"
"""The student before its DMD stage, kept under the work folder for the model card's ablation row."""

VIDEO_STAGES = ("judge", "teacher", "forcing", "self-forcing", "long-rollouts", "evaluate")
VIDEO_TEACHER_DIR = "shapes-video-teacher"
VIDEO_STUDENT_DIR = "shapes-video"
FORCING_ONLY_DIR = "shapes-video-forcing-only"
VIDEO_JUDGE_DIR = "shapes-video-judge"
IMAGE_EVALUATION = {"judge": CLASSIFIER_DIR, "probes": "shapes-attributes"}
VIDEO_EVALUATION = {"judge": VIDEO_JUDGE_DIR, "probes": "shapes-motion"}
"""What a student's manifest names as its judge and probe set (`fewstep.evaluation`): the serving gate
and the quantization gate judge it with these."""


@dataclass
class ImageRecipe:
    """Step counts and sizes of a full run. `quick()` is the seconds-long smoke variant."""

    seed: int = 0
    classifier_steps: int = 300
    teacher_steps: int = 2000
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    unet_width: int = 32
    sampler: dict[str, Any] = field(default_factory=lambda: {"steps": 25, "guidance": 3.0})
    pair_count: int = 3072
    pair_sampler_steps: int = 16
    student_steps: int = 1200
    student_batch: int = 64
    student_lr: float = 3e-4
    dmd_steps: int = 300
    eval_images_per_prompt: int = 16
    diversity_prompts: int = 8
    diversity_seeds: int = 32
    mode_seeds: int = 64
    """Seeds per prompt of the modes table (background mix, position, size, pixel spread)."""
    hybrid_teacher_steps: int = 6
    hybrid_spacing: float = 3.0
    """Teacher Euler steps over the first interval in the `trajectory` hybrid hand-off, and how they crowd
    near t = 1 (`models.sampling.Handoff`)."""
    judge_probe_cell: int = 24
    """Images per (attribute value, phrasing) of the judge report's held-out attribute probes."""
    judge_control_images: int = 300
    """Real images the judge's negative controls and corruptions are made from."""
    # Encode every training caption up front (~4800, ~25 s here): worth it for thousands of steps,
    # not for a smoke run that sees a few dozen captions (those are encoded as they come).
    bank_all_captions: bool = True

    @classmethod
    def quick(cls) -> ImageRecipe:
        return cls(
            bank_all_captions=False,
            classifier_steps=5,
            teacher_steps=3,
            teacher_batch=8,
            unet_width=16,
            sampler={"steps": 2, "guidance": 3.0},
            pair_count=16,
            pair_sampler_steps=12,
            student_steps=3,
            student_batch=8,
            dmd_steps=2,
            eval_images_per_prompt=1,
            diversity_prompts=2,
            diversity_seeds=2,
            mode_seeds=2,
            hybrid_teacher_steps=1,
            judge_probe_cell=1,
            judge_control_images=20,
        )


@dataclass
class VideoRecipe:
    """Sizes and step counts of a run. `quick()` is the seconds-long smoke variant."""

    seed: int = 0
    size: int = 16
    patch: int = 4
    frames: int = 8
    dim: int = 64
    heads: int = 4
    layers: int = 3
    width: int = 48
    sink: int = 1
    window: int = 4
    residual: bool = True
    teacher_steps: int = 1200
    batch: int = 24
    lr: float = 1e-3
    drop_prob: float = 0.1
    context_noise: float = 0.2
    """Most Gaussian noise (σ, per clip, drawn uniformly from 0) added to the clean context frames in
    training: a model shown only perfect context copies its own errors forward and fades out."""
    ema_decay: float = 0.999
    sampler_steps: int = 16
    guidance: float = 3.0
    judge_steps: int = 400
    forcing_steps: int = 2000
    forcing_lr: float = 1e-3
    one_step_share: float = 0.7
    """Share of training frames at t = 1 (the 1-step map, and every stream's first step); the rest are at
    the lower timesteps of the 2–4 step schedules."""
    student_batch: int = 16
    student_lr: float = 2e-4
    self_forcing_steps: int = 800
    self_forcing_frames: int = 16
    """Rollout length at the end of the self-forcing stage: it grows from `frames` to this, so the student
    meets its own output after longer and longer stretches of itself. (Longer rollouts with the loss on
    their last frames did worse: docs/decisions/video-quality.md.)"""
    long_steps: int = 300
    long_frames_from: int = 16
    long_frames_to: int = 48
    long_lr: float = 1e-4
    """The `long-rollouts` stage: steps, rollout length growing from/to, and learning rate."""
    default_steps: int = 2
    eval_streams: int = 32
    eval_frames: int = 256
    check_streams: int = 128
    """Streams of the served student's drift check at the default steps. The model card's tables use
    `eval_streams`, too few to tell a few points apart late in a stream: a stream that loses its shape
    keeps it lost, so each stream is about one sample (± 0.07 at 32 streams)."""

    @classmethod
    def quick(cls) -> VideoRecipe:
        return cls(
            frames=4,
            dim=32,
            heads=2,
            layers=1,
            width=8,
            window=2,
            teacher_steps=3,
            batch=2,
            sampler_steps=2,
            judge_steps=3,
            student_batch=2,
            forcing_steps=2,
            self_forcing_steps=2,
            self_forcing_frames=12,
            long_steps=2,
            long_frames_from=6,
            long_frames_to=8,
            eval_streams=2,
            eval_frames=20,
            check_streams=3,
        )

    def config(self) -> VideoConfig:
        return VideoConfig(
            size=self.size,
            patch=self.patch,
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
            width=self.width,
            sink=self.sink,
            window=self.window,
            residual=self.residual,
        )
