"""`fewstep train image`: classifier → teacher → step-adaptive student → evaluation → model card.

Each stage writes a checkpoint folder (safetensors + manifest) under `--out` (default
`checkpoints/`), so a stage can be re-run on its own with `--stages`. Everything is seeded;
the same seed and step counts give the same weights on the same torch build.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from fewstep.evaluation.classifier import ARCHITECTURE
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.schedules import TeacherSampler
from fewstep.models.text import TextEncoder, encoder_meta
from fewstep.models.unet import image_unet_config
from fewstep.trainer import classifier as clf
from fewstep.trainer.captions import CaptionBank
from fewstep.trainer.distill import stage_student
from fewstep.trainer.evaluate import stage_evaluate
from fewstep.trainer.plots import save_curves
from fewstep.trainer.stages import CLASSIFIER_DIR, IMAGE_STAGES, TEACHER_DIR, ImageRecipe
from fewstep.trainer.teacher import train_teacher


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
            "architecture": {"class": ARCHITECTURE},
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
    unknown = [s for s in stages if s not in IMAGE_STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from {IMAGE_STAGES}")
    torch.set_num_threads(threads)
    encoder = TextEncoder()
    bank: CaptionBank | None = None
    captions = None if recipe.bank_all_captions else [""]
    for stage in stages:
        print(f"[train image] stage {stage}", flush=True)
        t0 = time.time()
        if stage == "classifier":
            stage_classifier(recipe, out, docs)
        elif stage == "teacher":
            bank = bank or CaptionBank(encoder, captions)
            stage_teacher(recipe, out, docs, bank)
        elif stage == "student":
            bank = bank or CaptionBank(encoder, captions)
            stage_student(recipe, out, docs, bank, work)
        else:
            stage_evaluate(recipe, out, docs, encoder, work)
        print(f"[train image] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
