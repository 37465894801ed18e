"""Probe sets: fixed prompts and seeds a model is asked to make, and what each should show.

A probe set is data: the same set gives the same inputs in every process, so a version gets the
same verdict wherever it is judged. A model's manifest names its probe set
(`"evaluation": {"probes": NAME}`); `PROBE_SETS` maps names to builders, each taking a size
(`count`: seeds per prompt for images, streams for video; `frames` per stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fewstep.evaluation import clips, shapes

ATTRIBUTE_SEED = 9_100_000
"""First seed of the serving gate's image probes (far from the trainer's evaluation seeds)."""
MOTION_SEED = 9_200_000
"""Seed of the video probes' clips and first seed of their streams."""


@dataclass(frozen=True)
class ProbeSet:
    """What to make (`prompts[i]` at `seeds[i]`) and, where known, what each should show.

    `frames` is 1 for images and the stream length for video. `labels` holds each probe's
    (colour, shape) and `clips` each stream's whole motion; either is empty when the set has no truth
    (then only agreement between versions can be judged)."""

    name: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    frames: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    clips: tuple[clips.Clip, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)


def attribute_probes(seeds_per_prompt: int, first_seed: int = ATTRIBUTE_SEED) -> ProbeSet:
    """One held-out prompt per (colour, shape), `seeds_per_prompt` seeds each: 20 prompts."""
    first: dict[tuple[str, str], str] = {}
    for prompt, colour, shape in shapes.eval_prompts():
        first.setdefault((colour, shape), prompt)
    combos = sorted(first.items())
    prompts = [p for _, p in combos for _ in range(seeds_per_prompt)]
    return ProbeSet(
        name="shapes-attributes",
        prompts=tuple(prompts),
        seeds=tuple(first_seed + i for i in range(len(prompts))),
        labels=tuple(key for key, _ in combos for _ in range(seeds_per_prompt)),
    )


def heldout_probes(seeds_per_prompt: int, first_seed: int) -> ProbeSet:
    """Every held-out prompt (each colour × shape in each held-out template), `seeds_per_prompt` seeds each."""
    held = shapes.eval_prompts()
    return ProbeSet(
        name="shapes-heldout",
        prompts=tuple(p for p, _, _ in held for _ in range(seeds_per_prompt)),
        seeds=tuple(first_seed + i for i in range(len(held) * seeds_per_prompt)),
        labels=tuple((c, s) for _, c, s in held for _ in range(seeds_per_prompt)),
    )


def motion_probes(streams: int, frames: int) -> ProbeSet:
    """`streams` fixed held-out clips' captions (a template never used in training), `frames` each."""
    rng = np.random.default_rng([MOTION_SEED])
    targets = clips.sample_clips(rng, streams)
    prompts = [clips.caption(c, rng, clips.HELDOUT_TEMPLATES) for c in targets]
    return ProbeSet(
        name="shapes-motion",
        prompts=tuple(prompts),
        seeds=tuple(MOTION_SEED + i for i in range(streams)),
        frames=frames,
        labels=tuple((c.scene.colour, c.scene.shape) for c in targets),
        clips=tuple(targets),
    )


PROBE_SETS: dict[str, Callable[[int, int], ProbeSet]] = {
    "shapes-attributes": lambda count, frames: attribute_probes(count),
    "shapes-motion": motion_probes,
}
"""Probe sets a manifest may name, by name: (count, frames) → the set."""
