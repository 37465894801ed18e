"""`fewstep train image`: classifier → teacher → step-adaptive student → evaluation → model card.

Each stage writes a checkpoint folder (safetensors + manifest) under `--out` (default
`checkpoints/`), so a stage can be re-run on its own with `--stages`. Everything is seeded;
the same seed and step counts give the same weights on the same torch build.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.models.checkpoint import load_checkpoint, save_checkpoint
from fewstep.models.schedules import TeacherSampler
from fewstep.models.text import DEFAULT_MAX_TOKENS, ENCODER_DIM, ENCODER_NAME, TextEncoder
from fewstep.models.unet import build_unet, image_unet_config
from fewstep.trainer import classifier as clf
from fewstep.trainer.captions import CaptionBank
from fewstep.trainer.plots import save_curves
from fewstep.trainer.teacher import train_teacher

STAGES = ("classifier", "teacher", "student", "evaluate")
CLASSIFIER_DIR, TEACHER_DIR, STUDENT_DIR = "shapes-classifier", "shapes-teacher", "shapes"


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

    @classmethod
    def quick(cls) -> ImageRecipe:
        return cls(
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
        )


def encoder_meta() -> dict[str, Any]:
    return {"name": ENCODER_NAME, "max_tokens": DEFAULT_MAX_TOKENS, "dim": ENCODER_DIM}


def load_unet(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    manifest, state = load_checkpoint(folder)
    unet = build_unet(manifest["architecture"]["config"])
    unet.load_state_dict(state)
    return manifest, unet.eval()


def load_classifier(folder: Path) -> clf.AttributeClassifier:
    _, state = load_checkpoint(folder)
    model = clf.AttributeClassifier()
    model.load_state_dict(state)
    return model.eval()


def stage_classifier(r: ImageRecipe, out: Path, docs: Path) -> None:
    t0 = time.time()
    model = clf.train_classifier(r.seed, r.classifier_steps)
    acc = clf.real_accuracy(model, r.seed)
    print(f"  classifier accuracy on real images: {acc}", flush=True)
    save_checkpoint(
        out / CLASSIFIER_DIR,
        model.state_dict(),
        {
            "name": CLASSIFIER_DIR,
            "version": "1",
            "kind": "classifier",
            "architecture": {"class": "AttributeClassifier"},
            "metrics": {"real": acc},
            "trainer": {"recipe": asdict(r), "seconds": round(time.time() - t0, 1)},
        },
    )


def stage_teacher(r: ImageRecipe, out: Path, docs: Path, bank: CaptionBank) -> None:
    t0 = time.time()
    config = image_unet_config(width=r.unet_width)
    unet, losses = train_teacher(config, bank, r.seed, r.teacher_steps, r.teacher_batch, r.teacher_lr)
    save_curves({"flow-matching loss": losses}, docs / "teacher_loss.png", "image teacher training")
    save_checkpoint(
        out / TEACHER_DIR,
        unet.state_dict(),
        {
            "name": TEACHER_DIR,
            "version": "1",
            "kind": "image-teacher",
            "architecture": {"class": "UNet2DConditionModel", "config": config},
            "text_encoder": encoder_meta(),
            "native_size": "32x32",
            "sampler": TeacherSampler(**r.sampler).to_dict(),
            "trainer": {"recipe": asdict(r), "seconds": round(time.time() - t0, 1), "final_loss": losses[-1]},
        },
    )


def run(
    stages: list[str], out: Path, docs: Path, recipe: ImageRecipe, threads: int, work: Path = Path("var/train")
) -> None:
    """Run the named stages in order. `work` keeps intermediate checkpoints (the ablation)."""
    torch.set_num_threads(threads)
    encoder = TextEncoder()
    bank: CaptionBank | None = None
    for stage in stages:
        print(f"[train image] stage {stage}", flush=True)
        t0 = time.time()
        if stage == "classifier":
            stage_classifier(recipe, out, docs)
        elif stage == "teacher":
            bank = bank or CaptionBank(encoder)
            stage_teacher(recipe, out, docs, bank)
        elif stage == "student":
            from fewstep.trainer.distill import stage_student

            bank = bank or CaptionBank(encoder)
            stage_student(recipe, out, docs, bank, work)
        elif stage == "evaluate":
            from fewstep.trainer.evaluate import stage_evaluate

            stage_evaluate(recipe, out, docs, encoder, work)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        print(f"[train image] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
