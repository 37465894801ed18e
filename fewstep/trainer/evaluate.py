"""Evaluation of the image teacher and student, written to `docs/MODEL_CARD.md`.

Metrics (all judged by the attribute classifier, the CLIP-score analogue):

* joint accuracy: shape and colour both as the prompt says, on held-out prompt templates;
* the same on paraphrases whose words never occur in training;
* Fréchet distance between classifier features of generated and real images (FID analogue);
* per-prompt diversity: mean pairwise feature distance over `diversity_seeds` seeds of one
  prompt, averaged over prompts, also as a ratio to the same statistic on real images;
* ms per image at batch 64 (NFE × network cost; for orientation, not a benchmark).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.evaluation import shapes
from fewstep.evaluation.classifier import FEATURE_DIM, AttributeClassifier, load_classifier, predict
from fewstep.evaluation.metrics import frechet, mean_pairwise
from fewstep.models.sampling import Handoff, HybridTeacher, initial_noise, student_sample_mixed, teacher_sample
from fewstep.models.schedules import FewStepSchedule, TeacherSampler
from fewstep.models.text import TextEncoder
from fewstep.models.unet import as_denoiser, load_unet
from fewstep.trainer import classifier as clf
from fewstep.trainer import modes_eval as me
from fewstep.trainer.judge_report import Sampler, batched, judge_report
from fewstep.trainer.plots import save_grid
from fewstep.trainer.report import set_manifest_field, update_metrics, write_card_section
from fewstep.trainer.stages import ABLATION_DIR, CLASSIFIER_DIR, STUDENT_DIR, TEACHER_DIR, ImageRecipe


@dataclass
class Row:
    name: str
    nfe: int
    joint: float
    shape: float
    colour: float
    paraphrase: float
    frechet: float
    diversity: float
    ms_per_image: float


def evaluate_sampler(
    name: str,
    nfe: int,
    fn: Sampler,
    judge: AttributeClassifier,
    real_feats: np.ndarray,
    per_prompt: int,
    div_prompts: int,
    div_seeds: int,
    real_div: float,
) -> tuple[Row, np.ndarray]:
    """Score one sampler; returns its row and the held-out images (for grids)."""
    held = shapes.eval_prompts()
    prompts = [p for p, _, _ in held for _ in range(per_prompt)]
    seeds = [1_000_000 + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    images = batched(fn, prompts, seeds)
    ms = (time.perf_counter() - t0) * 1000 / len(prompts)
    s, c, feats = predict(judge, images)
    ys = np.array([shapes.SHAPES.index(sh) for _, _, sh in held for _ in range(per_prompt)])
    yc = np.array([shapes.COLOUR_NAMES.index(co) for _, co, _ in held for _ in range(per_prompt)])

    para_prompts = [p for p, _, _ in shapes.PARAPHRASES for _ in range(per_prompt)]
    pimg = batched(fn, para_prompts, [2_000_000 + i for i in range(len(para_prompts))])
    ps, pc, _ = predict(judge, pimg)
    pys = np.array([shapes.SHAPES.index(sh) for _, _, sh in shapes.PARAPHRASES for _ in range(per_prompt)])
    pyc = np.array([shapes.COLOUR_NAMES.index(co) for _, co, _ in shapes.PARAPHRASES for _ in range(per_prompt)])

    divs = []
    for p, _, _ in held[:: max(1, len(held) // div_prompts)][:div_prompts]:
        dimg = fn([p] * div_seeds, [3_000_000 + i for i in range(div_seeds)])
        divs.append(mean_pairwise(predict(judge, dimg)[2]))
    row = Row(
        name=name,
        nfe=nfe,
        joint=float(((s == ys) & (c == yc)).mean()),
        shape=float((s == ys).mean()),
        colour=float((c == yc).mean()),
        paraphrase=float(((ps == pys) & (pc == pyc)).mean()),
        frechet=frechet(feats, real_feats),
        diversity=float(np.mean(divs)) / real_div,
        ms_per_image=ms,
    )
    print(
        f"  {name}: joint {row.joint:.3f} paraphrase {row.paraphrase:.3f} frechet {row.frechet:.2f} "
        f"diversity {row.diversity:.2f} ({ms:.1f} ms/image)",
        flush=True,
    )
    return row, images


def real_diversity(judge: AttributeClassifier, seed: int, prompts: int, seeds: int) -> float:
    """The diversity statistic on real images that share (colour, shape), as the reference scale."""
    rng = np.random.default_rng([seed, 99])
    vals = []
    for k in range(prompts):
        colour, shape = shapes.COLOUR_NAMES[k % 5], shapes.SHAPES[k % 4]
        scenes = [s for s in shapes.sample_scenes(rng, seeds * 24) if s.colour == colour and s.shape == shape]
        while len(scenes) < seeds:
            scenes += [s for s in shapes.sample_scenes(rng, seeds * 24) if s.colour == colour and s.shape == shape]
        vals.append(mean_pairwise(predict(judge, shapes.render(scenes[:seeds], rng))[2]))
    return float(np.mean(vals))


def teacher_fn(unet: torch.nn.Module, sampler: TeacherSampler, enc: TextEncoder) -> Sampler:
    null_s, null_m = enc.encode([""])

    def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
        s, m = enc.encode(prompts)
        x, _ = teacher_sample(as_denoiser(unet), sampler, s, m, null_s, null_m, initial_noise(seeds))
        return x.clamp(-1, 1).numpy()

    return run


def student_fn(
    unet: torch.nn.Module, schedule: FewStepSchedule, steps: int, enc: TextEncoder, teacher: HybridTeacher | None = None
) -> Sampler:
    """The student at `steps`; with `teacher`, the hybrid (teacher takes the first step)."""
    net = as_denoiser(unet, schedule.timestep_scale)

    def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
        s, m = enc.encode(prompts)
        x0 = student_sample_mixed(
            net, schedule, [steps] * len(seeds), s, m, seeds, hybrid=[teacher is not None] * len(seeds), teacher=teacher
        )
        return x0.clamp(-1, 1).numpy()

    return run


def _table(rows: list[Row], teacher_joint: float) -> str:
    lines = [
        "| sampler | NFE | joint acc. | × teacher | shape | colour | paraphrase joint | Fréchet ↓ "
        "| diversity (× real) | ms/image (b64) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.nfe} | {r.joint:.3f} | {r.joint / teacher_joint:.2f} | {r.shape:.3f} | {r.colour:.3f} | "
            f"{r.paraphrase:.3f} | {r.frechet:.2f} | {r.diversity:.2f} | {r.ms_per_image:.1f} |"
        )
    return "\n".join(lines)


def stage_evaluate(r: ImageRecipe, out: Path, docs: Path, enc: TextEncoder, work: Path) -> None:
    judge = load_classifier(out / CLASSIFIER_DIR)
    real_acc = clf.real_accuracy(judge, r.seed)
    xr, _, _ = shapes.batch(r.seed + 271828, 0, 2000)
    real_feats = predict(judge, xr)[2]
    real_div = real_diversity(judge, r.seed, r.diversity_prompts, r.diversity_seeds)
    args = (judge, real_feats, r.eval_images_per_prompt, r.diversity_prompts, r.diversity_seeds, real_div)

    t_manifest, teacher = load_unet(out / TEACHER_DIR)
    sampler = TeacherSampler.from_dict(t_manifest["sampler"])
    rows: list[Row] = []
    grids: dict[str, np.ndarray] = {}
    row, img = evaluate_sampler(
        f"teacher, Euler {sampler.steps} steps, CFG {sampler.guidance:g}",
        2 * sampler.steps,
        teacher_fn(teacher, sampler, enc),
        *args,
    )
    rows.append(row)
    grids["teacher"] = img
    students = [("student", out / STUDENT_DIR)]
    if r.dmd_steps > 0 and (work / ABLATION_DIR).exists():
        students.insert(0, ("student, ODE regression only (ablation)", work / ABLATION_DIR))
    s_metrics: dict[str, Any] = {}
    for label, folder in students:
        s_manifest, student = load_unet(folder)
        schedule = FewStepSchedule.from_dict(s_manifest["schedule"])
        for steps in schedule.steps:
            row, img = evaluate_sampler(
                f"{label}, {steps} step{'s' if steps > 1 else ''}",
                steps,
                student_fn(student, schedule, steps, enc),
                *args,
            )
            rows.append(row)
            if folder == out / STUDENT_DIR:
                grids[f"student {steps}"] = img
                s_metrics[str(steps)] = {
                    "joint": row.joint,
                    "paraphrase": row.paraphrase,
                    "frechet": row.frechet,
                    "diversity": row.diversity,
                }
    s_manifest, student = load_unet(out / STUDENT_DIR)
    schedule = FewStepSchedule.from_dict(s_manifest["schedule"])
    null_s, null_m = enc.encode([""])
    handoffs = {
        "renoise": Handoff("renoise"),
        "trajectory": Handoff("trajectory", r.hybrid_teacher_steps, r.hybrid_spacing),
    }
    hybrids = {
        name: HybridTeacher(as_denoiser(teacher), sampler.guidance, null_s, null_m, h) for name, h in handoffs.items()
    }
    h_metrics: dict[str, Any] = {}
    hybrid_joint: dict[tuple[str, int], float] = {}
    for name, ht in hybrids.items():
        for steps in [n for n in schedule.steps if n > 1]:
            row, img = evaluate_sampler(
                f"hybrid, {_handoff_label(ht.handoff)}, {steps} steps",
                ht.nfe + steps - 1,
                student_fn(student, schedule, steps, enc, ht),
                *args,
            )
            rows.append(row)
            hybrid_joint[(name, steps)] = row.joint
            h_metrics.setdefault(name, {})[str(steps)] = {
                "joint": row.joint,
                "frechet": row.frechet,
                "diversity": row.diversity,
            }

    # Modes: where the seed's freedom goes (background, position, size), per prompt over `mode_seeds` seeds.
    mode_rows = [
        me.real_row(r.mode_seeds, r.seed, judge, real_div),
        me.sampler_row(rows[0].name, rows[0].nfe, teacher_fn(teacher, sampler, enc), r.mode_seeds, judge, real_div),
    ]
    t_modes = mode_rows[1]
    for steps in schedule.steps:
        fn = student_fn(student, schedule, steps, enc)
        label = f"student, {steps} step{'s' if steps > 1 else ''}"
        mode_rows.append(me.sampler_row(label, steps, fn, r.mode_seeds, judge, real_div))
    scored: dict[str, list[me.HybridGoals]] = {}
    goal_rows: list[tuple[str, me.HybridGoals]] = []
    for name, ht in hybrids.items():
        for steps in [n for n in schedule.steps if n > 1]:
            label = f"hybrid, {_handoff_label(ht.handoff)}, {steps} steps"
            fn = student_fn(student, schedule, steps, enc, ht)
            mr = me.sampler_row(label, ht.nfe + steps - 1, fn, r.mode_seeds, judge, real_div)
            mode_rows.append(mr)
            g = me.goals(mr, t_modes, s_metrics[str(steps)]["joint"] - hybrid_joint[(name, steps)])
            scored.setdefault(name, []).append(g)
            goal_rows.append((label, g))
            h_metrics[name][str(steps)]["modes"] = {**mr.modes.as_dict(), "tv_to_teacher": g.tv}
    chosen = me.choose_handoff(scored)
    # The pair serves the hand-off that measured best (the manifest says which: `sampling.Handoff`).
    set_manifest_field(out / STUDENT_DIR, "hybrid", handoffs[chosen].to_dict())
    modes_metrics = {row.name: row.modes.as_dict() for row in mode_rows}
    served = hybrids[chosen]
    judge_text = judge_report(
        judge,
        r.seed,
        {
            rows[0].name: teacher_fn(teacher, sampler, enc),
            "student, 1 step": student_fn(student, schedule, 1, enc),
            "student, 4 steps": student_fn(student, schedule, 4, enc),
            f"hybrid, {_handoff_label(served.handoff)}, 4 steps": student_fn(student, schedule, 4, enc, served),
        },
        per_cell=r.judge_probe_cell,
        control_images=r.judge_control_images,
    )
    _seed_grids(
        docs,
        enc,
        {
            "teacher": teacher_fn(teacher, sampler, enc),
            "student": student_fn(student, schedule, 4, enc),
            "hybrid": student_fn(student, schedule, 4, enc, hybrids["renoise"]),
            "hybrid_trajectory": student_fn(student, schedule, 4, enc, hybrids["trajectory"]),
        },
    )
    teacher_joint = rows[0].joint
    update_metrics(
        out / TEACHER_DIR,
        {
            "joint": rows[0].joint,
            "paraphrase": rows[0].paraphrase,
            "frechet": rows[0].frechet,
            "diversity": rows[0].diversity,
        },
    )
    update_metrics(
        out / STUDENT_DIR,
        {"by_steps": s_metrics, "hybrid_by_steps": h_metrics, "teacher_joint": teacher_joint, "modes": modes_metrics},
    )

    per = r.eval_images_per_prompt
    picks = [i * per for i in range(0, len(shapes.eval_prompts()), 5)][:8]
    order = ["teacher", "student 1", "student 2", "student 3", "student 4"]
    grid = np.concatenate([grids[k][picks] for k in order if k in grids])
    save_grid(grid, docs / "samples.png", cols=len(picks), scale=3)
    modes_text = ModesText(
        me.table(mode_rows, t_modes), me.goals_table(goal_rows), chosen, handoffs[chosen], judge_text
    )
    grid_prompts = [shapes.eval_prompts()[i // per][0] for i in picks]
    _write_card(docs, rows, teacher_joint, real_acc, real_div, r, grid_prompts, modes_text)


def _handoff_label(h: Handoff) -> str:
    if h.kind == "renoise":
        return "teacher step 1 re-noised"
    return f"teacher ODE {h.teacher_steps} step{'s' if h.teacher_steps > 1 else ''}"


@dataclass
class ModesText:
    table: str
    goals: str
    chosen: str
    handoff: Handoff
    judge: str


SEED_GRID_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a purple cross")


def _seed_grids(docs: Path, enc: TextEncoder, samplers: dict[str, Sampler], seeds: int = 8) -> None:
    """One PNG per sampling mode: a row per prompt, the same `seeds` seeds in every row and mode."""
    for mode, fn in samplers.items():
        prompts = [p for p in SEED_GRID_PROMPTS for _ in range(seeds)]
        images = fn(prompts, [4_000_000 + i for _ in SEED_GRID_PROMPTS for i in range(seeds)])
        save_grid(images, docs / f"seeds_{mode}.png", cols=seeds, scale=3)


def _write_card(
    docs: Path,
    rows: list[Row],
    teacher_joint: float,
    real_acc: dict,
    real_div: float,
    r: ImageRecipe,
    grid_prompts: list[str],
    m: ModesText,
) -> None:
    chosen = _handoff_label(m.handoff)
    body = f"""
## Image models: `shapes` (student) and `shapes-teacher`

Produced by `make train` (`fewstep train image`, seed {r.seed}); this section is rewritten by its
`evaluate` stage (`fewstep train image --stages evaluate` re-runs it alone).

**Data.** Procedural 32×32 scenes: one shape (circle, square, triangle, cross) in one of five colours
(red, green, blue, yellow, purple), radius 6–11 px, anywhere in the frame, on a black, gray or white
background, with colour jitter. Captions come from {len(shapes.TRAIN_TEMPLATES)} templates with 2–3
synonyms per word.

**Judge.** An attribute classifier (CNN, two heads) trained on the procedural data; on
{real_acc["n"]} fresh real images it scores shape {real_acc["shape"]:.3f}, colour {real_acc["colour"]:.3f},
joint {real_acc["joint"]:.3f}.

**Held-out prompts.** Every colour × shape in templates never used in training
({", ".join(repr(t) for t in shapes.HELDOUT_TEMPLATES)}), {r.eval_images_per_prompt} seeds each
({len(shapes.eval_prompts()) * r.eval_images_per_prompt} images per row). *Paraphrase joint* uses words never
seen in training:
{", ".join(repr(p) for p, _, _ in shapes.PARAPHRASES)} ({r.eval_images_per_prompt} seeds each).

**Fréchet** is computed on the classifier's {FEATURE_DIM}-d features against 2000 real images.
**Diversity** is the mean pairwise feature distance over {r.diversity_seeds} seeds of one prompt,
averaged over {r.diversity_prompts} prompts, divided by the same statistic on real images of one
colour and shape ({real_div:.3f}); 1.0 means as varied as the data.

{_table(rows, teacher_joint)}

NFE counts network evaluations per image: the teacher's classic CFG costs 2 per step; the student
has CFG baked in. ms/image is wall time of the evaluation loop at batch 64 on this machine (2 CPU
cores, shared), for orientation only: `bench/` holds the benchmarks.

**Hybrid** rows are the diversity-distillation hybrid (`"hybrid": true`), with two hand-offs from the
teacher (its own classic CFG) to the student (`models/sampling.py`, `Handoff`):

* *teacher step 1 re-noised* (`renoise`, the diversity-distillation paper's recipe): the teacher takes
  the first step of the student's k-step list at t = 1 and the schedule's re-noise moves its x0
  prediction to the next timestep with fresh noise (NFE = 2 + (k − 1)). The shipped teacher is a
  flow-matching model, whose t = 1 is pure noise: its x0 estimate there is the prompt's mean image, so
  the re-noise keeps nothing of the seed.
* *teacher ODE* (`trajectory`): the teacher integrates its own probability-flow ODE from t = 1 to the
  student's second timestep t₁ in {r.hybrid_teacher_steps} Euler steps crowded near t = 1
  (t_i = 1 − (1 − t₁)(i/{r.hybrid_teacher_steps})^{r.hybrid_spacing:g}), and the student continues from that
  state: the seed's noise survives the hand-off (NFE = {2 * r.hybrid_teacher_steps} + (k − 1)).

The student's manifest serves **{chosen}** (`"hybrid": {json.dumps(m.handoff.to_dict())}`): of the two, the
hand-off that meets more of the goals below.

**Modes.** What the prompt leaves to the seed, read from pixels (`evaluation/modes.py`): the share of
black, gray and white backgrounds (the median colour of the outermost ring), the spread of the shape's
centroid and size (its mask: pixels far from the background), and the pixel diversity (mean RMS distance
between two images, [0, 1] units), next to the classifier's feature diversity and joint accuracy. Per
prompt over {r.mode_seeds} seeds ({", ".join(repr(p) for p, _, _ in me.MODE_PROMPTS)}; the same seeds for every
sampler), averaged over the prompts. The data draws every background equally; a sampler can score
perfectly on the classifier and still draw one background only.

{m.table}

Hybrid goals (modes against the teacher's, joint accuracy against the student's at the same steps on the
held-out prompts, NFE against the teacher's {rows[0].nfe}):

{m.goals}

Seed grids, one per mode (rows: {", ".join(repr(p) for p in SEED_GRID_PROMPTS)};
the same 8 seeds in every row and mode; student and hybrids at 4 steps):
teacher ![teacher seeds](seeds_teacher.png) student ![student seeds](seeds_student.png)
hybrid, re-noised ![hybrid seeds](seeds_hybrid.png) hybrid, teacher ODE ![hybrid seeds](seeds_hybrid_trajectory.png)

## What the judge can and cannot see

{m.judge}

Samples (rows: teacher, then the student at 1, 2, 3 and 4 steps; columns: the prompts
{", ".join(repr(p) for p in grid_prompts)}; same seed per column):

![samples](samples.png)

Training curves: ![teacher loss](teacher_loss.png) ![student loss](student_loss.png)

```json
{json.dumps([r.__dict__ for r in rows], indent=1)}
```
"""
    write_card_section(docs, "image-eval", body)
