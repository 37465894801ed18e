"""Diversity where the modes live, for the model card: background mix, position, size and pixel spread per prompt.

For each of a few prompts, `seeds` images (the same seeds for every sampler) are reduced to their modes
(`evaluation.modes`): the share of each background colour, the spread of the shape's position and size, and
the pixel-space pairwise distance, next to the attribute classifier's feature spread and joint accuracy.
Rows: real data of the prompt's colour and shape, the teacher, the student at every step count, and the
hybrid with each hand-off (`models.sampling.Handoff`).

The hybrid's goals (the hand-off is there to give back the teacher's modes at a fraction of its cost):
its background mix within `TV_GOAL` total-variation distance of the teacher's, pixel diversity at least
`PIXEL_GOAL` × the teacher's, joint accuracy within `JOINT_GOAL` of the student's at the same steps, at no
more than a third of the teacher's NFE. `choose_handoff` picks, of the hand-offs measured, the one that
meets most goals (then the smaller background distance): the student's manifest serves that one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fewstep.evaluation import modes, shapes
from fewstep.evaluation.classifier import AttributeClassifier, predict
from fewstep.evaluation.metrics import mean_pairwise

Sampler = Callable[[list[str], list[int]], np.ndarray]

MODE_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("a red circle", "red", "circle"),
    ("a blue square", "blue", "square"),
    ("a yellow triangle", "yellow", "triangle"),
    ("a purple cross", "purple", "cross"),
)
MODE_SEED = 5_000_000
TV_GOAL, PIXEL_GOAL, JOINT_GOAL = 0.15, 0.85, 0.03


@dataclass
class ModesRow:
    name: str
    nfe: int
    modes: modes.Modes
    feature_diversity: float
    joint: float
    per_prompt_background: list[tuple[float, ...]]


def real_images(colour: str, shape: str, n: int, seed: int) -> np.ndarray:
    """`n` real images of one colour and shape (every background, size and position the data draws)."""
    rng = np.random.default_rng([seed, 77])
    scenes: list[shapes.Scene] = []
    while len(scenes) < n:
        scenes += [s for s in shapes.sample_scenes(rng, 40 * n) if s.colour == colour and s.shape == shape]
    return shapes.render(scenes[:n], rng)


def measure(
    name: str, nfe: int, images_for: Callable[[str, str, str], np.ndarray], judge: AttributeClassifier, real_div: float
) -> ModesRow:
    """One row: `images_for(prompt, colour, shape)` gives one prompt's images."""
    sets, divs, hits, per_prompt = [], [], [], []
    for prompt, colour, shape in MODE_PROMPTS:
        images = images_for(prompt, colour, shape)
        m = modes.describe(images)
        sets.append(m)
        per_prompt.append(m.background)
        s, c, f = predict(judge, images)
        divs.append(mean_pairwise(f) / real_div)
        hits.append(((s == shapes.SHAPES.index(shape)) & (c == shapes.COLOUR_NAMES.index(colour))).mean())
    row = ModesRow(name, nfe, modes.mean_modes(sets), float(np.mean(divs)), float(np.mean(hits)), per_prompt)
    bg = "/".join(f"{v:.2f}" for v in row.modes.background)
    print(
        f"  modes {name}: background {bg} pixel diversity {row.modes.pixel_diversity:.3f} joint {row.joint:.3f}",
        flush=True,
    )
    return row


def sampler_row(name: str, nfe: int, fn: Sampler, seeds: int, judge: AttributeClassifier, real_div: float) -> ModesRow:
    return measure(name, nfe, lambda p, _c, _s: fn([p] * seeds, [MODE_SEED + i for i in range(seeds)]), judge, real_div)


def real_row(seeds: int, seed: int, judge: AttributeClassifier, real_div: float) -> ModesRow:
    return measure("real data", 0, lambda _p, c, s: real_images(c, s, seeds, seed), judge, real_div)


@dataclass(frozen=True)
class HybridGoals:
    """One hybrid row against the goals."""

    tv: float
    pixel_ratio: float
    joint_gap: float
    nfe_share: float

    @property
    def met(self) -> list[bool]:
        return [
            self.tv <= TV_GOAL,
            self.pixel_ratio >= PIXEL_GOAL,
            self.joint_gap <= JOINT_GOAL,
            self.nfe_share <= 1 / 3 + 1e-9,
        ]


def goals(hybrid: ModesRow, teacher: ModesRow, joint_gap: float) -> HybridGoals:
    """`joint_gap`: the student's joint accuracy minus the hybrid's at the same steps (on the held-out prompts)."""
    return HybridGoals(
        tv=modes.tv_distance(hybrid.modes.background, teacher.modes.background),
        pixel_ratio=hybrid.modes.pixel_diversity / teacher.modes.pixel_diversity,
        joint_gap=joint_gap,
        nfe_share=hybrid.nfe / teacher.nfe,
    )


def choose_handoff(scored: dict[str, list[HybridGoals]]) -> str:
    """The hand-off whose rows meet most goals in all (ties: the smaller mean background distance)."""
    return min(scored, key=lambda h: (-sum(sum(g.met) for g in scored[h]), float(np.mean([g.tv for g in scored[h]]))))


def table(rows: list[ModesRow], teacher: ModesRow) -> str:
    names = "/".join(shapes.BACKGROUND_NAMES)
    lines = [
        f"| sampler | NFE | background {names} | TV to teacher ↓ | position spread (px) | size (px) "
        "| pixel diversity | × teacher | feature diversity (× real) | joint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.modes
        lines.append(
            f"| {r.name} | {r.nfe or '–'} | {' / '.join(f'{v:.2f}' for v in m.background)} "
            f"| {modes.tv_distance(m.background, teacher.modes.background):.2f} | {m.position_spread:.2f} "
            f"| {m.size_mean:.1f} ± {m.size_spread:.1f} | {m.pixel_diversity:.3f} "
            f"| {m.pixel_diversity / teacher.modes.pixel_diversity:.2f} | {r.feature_diversity:.2f} | {r.joint:.3f} |"
        )
    return "\n".join(lines)


def goals_table(rows: list[tuple[str, HybridGoals]]) -> str:
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        f"| hybrid | background TV to teacher (goal ≤ {TV_GOAL}) | pixel diversity × teacher (goal ≥ {PIXEL_GOAL}) "
        f"| joint below the student's (goal ≤ {JOINT_GOAL:.2f}) | NFE × teacher (goal ≤ 0.33) |",
        "|---|---|---|---|---|",
    ]
    for name, g in rows:
        tv, px, joint, nfe = g.met
        lines.append(
            f"| {name} | {g.tv:.2f} ({mark(tv)}) | {g.pixel_ratio:.2f} ({mark(px)}) "
            f"| {g.joint_gap:+.3f} ({mark(joint)}) | {g.nfe_share:.2f} ({mark(nfe)}) |"
        )
    return "\n".join(lines)
