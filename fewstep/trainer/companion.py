"""The companion training worker: keeps distilling the promoted student and pushes every round.

`fewstep trainer` runs rounds until stopped (or `--rounds`). One round:

1. takes the registry's promoted student and the exact teacher it was distilled from (found
   by the sha256 its manifest records), and the promoted attribute classifier;
2. draws fresh ODE pairs from the teacher (a new seed per round, so every round sees new data);
3. fine-tunes the student on them by ODE-pair regression for `steps` steps, or until the
   round's `minutes` are spent, whichever comes first;
4. evaluates it: joint attribute accuracy per step count on held-out prompts, into the manifest;
5. publishes it into the registry as the next version, promotes it, and announces it.

It never judges whether its own version should serve: the serving processes' gate does that
(service/gate.py) against the version they serve, so a bad round is refused there and the
next round starts again from whatever is promoted.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError, NotFound
from fewstep.evaluation.classifier import AttributeClassifier, load_classifier
from fewstep.evaluation.judges import joint_accuracy
from fewstep.evaluation.probes import attribute_probes
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.registry import Registry
from fewstep.models.schedules import FewStepSchedule, TeacherSampler
from fewstep.models.text import TextEncoder
from fewstep.models.unet import load_unet
from fewstep.trainer.captions import CaptionBank
from fewstep.trainer.distill import make_pairs, train_student
from fewstep.trainer.evaluate import student_fn
from fewstep.trainer.progress import beat

log = logging.getLogger("fewstep.trainer")


@dataclass
class CompanionRecipe:
    """One round's work. The defaults take about a minute per round on 2 CPU cores."""

    pairs: int = 256
    pair_sampler_steps: int = 16
    steps: int = 200
    minutes: float = 10.0
    batch: int = 32
    lr: float = 3e-5
    eval_seeds: int = 2
    seed: int = 0


def evaluate(
    unet: torch.nn.Module, schedule: FewStepSchedule, encoder: TextEncoder, judge: AttributeClassifier, seeds: int
) -> dict[str, float]:
    """Joint (shape and colour) accuracy per step count on one held-out prompt per (colour, shape)."""
    probes = attribute_probes(seeds, first_seed=7_300_000)
    out = {}
    for steps in schedule.steps:
        images = student_fn(unet, schedule, steps, encoder)(list(probes.prompts), list(probes.seeds))
        out[str(steps)] = round(joint_accuracy(judge, images, probes.labels), 4)
    return out


def train_round(
    registry: Registry,
    model: str,
    recipe: CompanionRecipe,
    encoder: TextEncoder,
    round_index: int,
    work: Path,
    judge_model: str = "shapes-classifier",
) -> Path:
    """One round of fine-tuning from the promoted version; returns the checkpoint folder it wrote."""
    t0 = time.monotonic()
    base = registry.promoted(model)
    if base is None:
        raise NotFound(f"model {model!r} has no promoted version to train from")
    manifest, student = load_unet(registry.version_dir(model, base))  # verifies the files' hashes
    ref = manifest.get("teacher") or {}
    teacher_version = registry.find(ref.get("name", ""), ref.get("sha256", "")) if ref else None
    if teacher_version is None:
        raise NotFound(f"{model}:{base} names no teacher that is in the registry ({ref.get('name')!r})")
    _, teacher = load_unet(registry.version_dir(ref["name"], teacher_version))  # frozen: no gradients
    judge_version = registry.promoted(judge_model)
    if judge_version is None:
        raise NotFound(f"no promoted {judge_model!r} in the registry to evaluate with")
    judge = load_classifier(registry.version_dir(judge_model, judge_version))

    seed = recipe.seed + 1000 * (round_index + 1)  # fresh pairs and batches every round
    # Only the null prompt is needed up front: a round's captions are encoded as its pairs are drawn.
    bank = CaptionBank(encoder, [""])
    sampler = TeacherSampler(
        steps=recipe.pair_sampler_steps, guidance=TeacherSampler.from_dict(ref["sampler"]).guidance
    )
    pairs = make_pairs(teacher, bank, sampler, seed, recipe.pairs)
    deadline = t0 + 60.0 * recipe.minutes
    student, losses = train_student(
        teacher, pairs, seed, recipe.steps, recipe.batch, recipe.lr, init=student, deadline=deadline
    )
    schedule = FewStepSchedule.from_dict(manifest["schedule"])
    accuracy = evaluate(student, schedule, encoder, judge, recipe.eval_seeds)
    out = work / f"{model}-round-{round_index}"
    shutil.rmtree(out, ignore_errors=True)
    new = {k: v for k, v in manifest.items() if k not in ("files", "version", "format")}
    new["metrics"] = {"joint_accuracy": accuracy, "images_per_step_count": 20 * recipe.eval_seeds}
    new["trainer"] = {
        "companion": {
            **asdict(recipe),
            "round": round_index,
            "base_version": base,
            "steps_run": len(losses),
            "final_loss": round(float(np.mean(losses[-10:])), 5),
            "seconds": round(time.monotonic() - t0, 1),
        },
    }
    save_checkpoint(out, student.state_dict(), new)
    return out


def run_trainer(
    registry: Registry,
    model: str,
    recipe: CompanionRecipe,
    rounds: int,
    push: Callable[[Path], str],
    work: Path = Path("var/trainer"),
    retry_s: float = 30.0,
) -> list[str]:
    """Train and push `rounds` rounds (0: until interrupted); returns the versions pushed.

    Run forever, a round that fails (the registry briefly unreachable, a version mid-rollback) is
    logged and tried again after `retry_s`; with a round count, the first failure is raised.
    """
    encoder = TextEncoder()
    pushed: list[str] = []
    k = 0
    while rounds == 0 or k < rounds:
        beat()
        try:
            folder = train_round(registry, model, recipe, encoder, k, work)
            version = push(folder)
        except (FewstepError, OSError):
            if rounds:
                raise
            log.exception("round %d failed; trying again in %.0f s", k, retry_s)
            time.sleep(retry_s)  # (well under the liveness probe's staleness: the next round beats)
            continue
        pushed.append(version)
        log.info("round %d pushed %s:%s", k, model, version)
        k += 1
    return pushed
