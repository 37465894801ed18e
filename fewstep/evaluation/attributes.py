"""Held-out attribute probes: what a prompt says beyond colour and shape, judged from pixels.

The attribute classifier reads shape and colour only, and saturates near 1.0 for every sampler. Prompts also
name a **background** ("on a white background"), a **size** ("small", "large") and a **position** ("in the top
left"); the classifier is blind to all three. These probes ask for each value of each, in a phrasing from
training and in one never used there (`HELDOUT_TEMPLATES`), and judge the result with `modes`' pixel
statistics (border colour, shape mask), no network, with anti-aliased edges weighed by coverage
(`soft_geometry`):

* background: the nearest data background to the image's border colour (`modes.background_index`);
* size: the shape's disc-equivalent radius against a per-shape threshold calibrated on real images
  (`calibrate`): the same radius gives a triangle a third less area than a circle;
* position: the third of the frame, across and down, that the shape's centroid falls in, by the rule of
  `shapes.Scene.position_word`, after removing the shape's calibrated centroid offset (a triangle's centroid
  sits 0.17 radii below the centre its scene names).

The pixel judge is validated on real images of the same probes (`real_images`): a low score on a model is then
the model's, not the judge's. `paraphrase_confusion` reports, for `shapes.PARAPHRASES`, which colour and shape
the classifier saw instead of the one asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fewstep.evaluation import modes, shapes
from fewstep.evaluation.classifier import AttributeClassifier, predict

Attribute = Literal["background", "size", "position"]
Phrasing = Literal["train", "held-out"]

ATTRIBUTES: tuple[Attribute, ...] = ("background", "size", "position")
PHRASINGS: tuple[Phrasing, ...] = ("train", "held-out")
VALUES: dict[Attribute, tuple[str, ...]] = {
    "background": shapes.BACKGROUND_NAMES,
    "size": ("small", "large"),
    "position": (
        "top left",
        "top",
        "top right",
        "left",
        "center",
        "right",
        "bottom left",
        "bottom",
        "bottom right",
    ),
}
"""Every value `shapes.Scene` can name, in the order confusion matrices use."""
TEMPLATES: dict[Attribute, dict[Phrasing, str]] = {
    "background": {"train": "a {c} {s} on a {v} background", "held-out": "a {c} {s} against a plain {v} backdrop"},
    "size": {"train": "a {v} {c} {s}", "held-out": "a {c} {s} that is {v}"},
    "position": {"train": "a {c} {s} in the {v}", "held-out": "a {c} {s} placed at the {v} of the frame"},
}
"""Per attribute, a phrasing from `shapes.TRAIN_TEMPLATES` and one whose words around the value never occur in
a training caption; `{v}` is the attribute's value."""
HELDOUT_TEMPLATES: tuple[str, ...] = tuple(t["held-out"] for t in TEMPLATES.values())

PROBE_SEED = 9_300_000
"""First seed of the probes (far from the trainer's and the serving gate's seeds)."""
SIZE_BOUNDARY = (shapes.MIN_RADIUS + shapes.MAX_RADIUS) / 2
"""The radius at which `shapes.Scene.size_word` turns from small to large."""


@dataclass(frozen=True)
class Probe:
    """One image to make: `prompt` at `seed`, which should show `expected` for `attribute`."""

    prompt: str
    seed: int
    attribute: Attribute
    phrasing: Phrasing
    expected: str
    colour: str
    shape: str


def attribute_probes(per_cell: int = 24, first_seed: int = PROBE_SEED) -> list[Probe]:
    """About `per_cell` probes per (attribute, phrasing), spread evenly over the attribute's values (rounded up:
    150 probes at the default 24); colour and shape cycle through all 20 pairs, so no prompt repeats while a value
    has at most 20 probes. Seeds are consecutive from `first_seed`."""
    probes: list[Probe] = []
    for attribute in ATTRIBUTES:
        values = VALUES[attribute]
        per_value = -(-per_cell // len(values))
        for phrasing in PHRASINGS:
            for value in values:
                for _ in range(per_value):
                    k = len(probes)
                    colour, shape = shapes.COLOUR_NAMES[k % 5], shapes.SHAPES[k % 4]
                    prompt = TEMPLATES[attribute][phrasing].format(c=colour, s=shape, v=value)
                    probes.append(Probe(prompt, first_seed + k, attribute, phrasing, value, colour, shape))
    return probes


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _coordinate(word: str, radius: float, rng: np.random.Generator) -> float:
    """A centre coordinate, with the shape inside the frame, in the third `word` names: "top"/"left" the first,
    "bottom"/"right" the last, "" the middle one."""
    third = shapes.SIZE / 3
    lo, hi = radius + 1.0, shapes.SIZE - radius - 1.0
    if word in ("top", "left"):
        return _uniform(rng, lo, third - 0.01)
    if word in ("bottom", "right"):
        return _uniform(rng, 2 * third + 0.01, hi)
    return _uniform(rng, max(lo, third), min(hi, 2 * third))


def scene_for(probe: Probe, rng: np.random.Generator) -> shapes.Scene:
    """A random real scene that shows what `probe` asks for (its colour, shape and attribute value); what the
    probe leaves open is drawn as `shapes.sample_scenes` draws it."""
    base = replace(shapes.sample_scenes(rng, 1)[0], colour=probe.colour, shape=probe.shape)
    if probe.attribute == "background":
        return replace(base, background=probe.expected)
    if probe.attribute == "size":
        small = probe.expected == "small"
        r = (
            _uniform(rng, shapes.MIN_RADIUS, SIZE_BOUNDARY)
            if small
            else _uniform(rng, SIZE_BOUNDARY, shapes.MAX_RADIUS)
        )
        lo, hi = r + 1.0, shapes.SIZE - r - 1.0
        return replace(base, radius=r, cx=_uniform(rng, lo, hi), cy=_uniform(rng, lo, hi))
    words = probe.expected.split()
    v = next((w for w in words if w in ("top", "bottom")), "")
    h = next((w for w in words if w in ("left", "right")), "")
    # A shape in an outer third must fit between the frame's one-pixel margin and the third's edge.
    r_max = min(shapes.MAX_RADIUS, shapes.SIZE / 3 - 1.5) if v or h else shapes.MAX_RADIUS
    r = _uniform(rng, shapes.MIN_RADIUS, r_max)
    return replace(base, radius=r, cx=_coordinate(h, r, rng), cy=_coordinate(v, r, rng))


def real_images(probes: list[Probe], seed: int) -> np.ndarray:
    """Real images, one per probe, each showing what its probe asks for: the pixel judge's reference."""
    rng = np.random.default_rng([seed, 4242])
    return shapes.render([scene_for(p, rng) for p in probes], rng)


SOFT_FLOOR = 0.1
"""RGB distance from the background below which a pixel counts as background in `soft_geometry` (generated
backgrounds are not perfectly flat)."""


def soft_geometry(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) centre (x, y) and (N,) size (disc-equivalent radius) of each image's shape, in pixels, from a soft
    coverage estimate: each pixel's distance from the border colour (`modes.border_colour`) divided by the
    shape's own distance (the 90th percentile over `modes.shape_mask`), clipped to [0, 1]. Anti-aliased edge
    pixels then count by how much the shape covers them; `modes.geometry`'s all-or-nothing mask moves a square's
    centroid by 0.19 px (sd) with the mask threshold, this by 0.05 px. An empty mask gives the frame's centre
    and size 0."""
    unit = modes.to_unit(images)
    d = np.sqrt(((unit - modes.border_colour(unit)[:, :, None, None]) ** 2).sum(1))
    mask = modes.shape_mask(unit)
    full = np.array([np.percentile(di[m], 90) if m.any() else np.inf for di, m in zip(d, mask, strict=True)])
    a = np.clip(d / full[:, None, None], 0.0, 1.0) * (d > SOFT_FLOOR)
    h, w = a.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = a.sum((1, 2))
    safe = np.maximum(area, 1e-9)
    cx = np.where(area > 0, (a * xs).sum((1, 2)) / safe, w / 2)
    cy = np.where(area > 0, (a * ys).sum((1, 2)) / safe, h / 2)
    return np.stack([cx, cy], axis=1), np.sqrt(area / np.pi)


@dataclass(frozen=True)
class Calibration:
    """Per shape, how the pixel judge reads size and position, fitted on real images of that shape."""

    size_threshold: dict[str, float]
    """Size (`soft_geometry`) from which the shape counts as large."""
    centre_offset: dict[str, tuple[float, float]]
    """(x, y) shift of the shape's centroid (`soft_geometry`) from the centre its scene names, per pixel of size:
    a triangle's area lies below that centre (about 0.22 × size), every other shape is symmetric (about 0)."""


def _best_threshold(size: np.ndarray, large: np.ndarray) -> float:
    """The midpoint between two neighbouring sorted sizes that puts the most images on their own side."""
    order = np.argsort(size)
    size, large = size[order], large[order]
    # Cutting after position i calls the first i + 1 small: right = small ones below + large ones above.
    right = np.cumsum(~large) + (large.sum() - np.cumsum(large))
    i = int(np.argmax(right[:-1]))
    return float((size[i] + size[i + 1]) / 2)


def calibrate(seed: int, per_shape: int = 400) -> Calibration:
    """Fit the per-shape size threshold and centroid offset on `per_shape` fresh real images of each shape."""
    rng = np.random.default_rng([seed, 8585])
    thresholds, offsets = {}, {}
    for shape in shapes.SHAPES:
        scenes = [replace(s, shape=shape) for s in shapes.sample_scenes(rng, per_shape)]
        centre, size = soft_geometry(shapes.render(scenes, rng))
        thresholds[shape] = _best_threshold(size, np.array([s.size_word == "large" for s in scenes]))
        shift = centre - np.array([(s.cx, s.cy) for s in scenes])
        kx, ky = (shift * size[:, None]).sum(0) / (size**2).sum()  # least squares through the origin
        offsets[shape] = (float(kx), float(ky))
    return Calibration(thresholds, offsets)


def _third_word(cx: float, cy: float) -> str:
    """The position word of a shape centred at (cx, cy): `shapes.Scene.position_word`'s own rule."""
    return shapes.Scene("circle", "red", "black", shapes.MIN_RADIUS, cx, cy).position_word


def judge(probes: list[Probe], images: np.ndarray, calibration: Calibration) -> list[str]:
    """The value each image shows for its probe's attribute, read from pixels. Size and position are read with
    the calibration of the shape the probe asked for (a model that draws another shape is read as that one)."""
    background = modes.background_index(modes.to_unit(images))
    centre, size = soft_geometry(images)
    judged = []
    for i, p in enumerate(probes):
        if p.attribute == "background":
            judged.append(shapes.BACKGROUND_NAMES[background[i]])
        elif p.attribute == "size":
            judged.append("large" if size[i] >= calibration.size_threshold[p.shape] else "small")
        else:
            kx, ky = calibration.centre_offset[p.shape]
            judged.append(_third_word(float(centre[i, 0] - kx * size[i]), float(centre[i, 1] - ky * size[i])))
    return judged


@dataclass(frozen=True)
class AttributeScores:
    """One sampler's probe results."""

    accuracy: dict[tuple[Attribute, Phrasing], float]
    """Share of probes judged as expected, per (attribute, phrasing)."""
    confusion: dict[Attribute, np.ndarray]
    """Per attribute, counts (expected value × judged value) in `VALUES` order, both phrasings together."""

    def attribute_accuracy(self, attribute: Attribute) -> float:
        """Share judged as expected over both phrasings."""
        m = self.confusion[attribute]
        return float(np.trace(m) / m.sum())


def score(probes: list[Probe], images: np.ndarray, calibration: Calibration) -> AttributeScores:
    """Judge `images` (one per probe, (N, 3, 32, 32) in [-1, 1]) against what each probe asked for."""
    if len(images) != len(probes):
        raise ValueError(f"need one image per probe: {len(probes)} probes. Given: {len(images)} images")
    judged = judge(probes, images, calibration)
    hits: dict[tuple[Attribute, Phrasing], list[bool]] = {(a, p): [] for a in ATTRIBUTES for p in PHRASINGS}
    confusion = {a: np.zeros((len(VALUES[a]),) * 2, dtype=np.int64) for a in ATTRIBUTES}
    for p, j in zip(probes, judged, strict=True):
        hits[p.attribute, p.phrasing].append(j == p.expected)
        confusion[p.attribute][VALUES[p.attribute].index(p.expected), VALUES[p.attribute].index(j)] += 1
    return AttributeScores({k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}, confusion)


def accuracy_markdown(rows: Mapping[str, AttributeScores]) -> str:
    """One row per sampler (e.g. "real images" first): accuracy per attribute and phrasing."""
    cells = [(a, p) for a in ATTRIBUTES for p in PHRASINGS]
    lines = [
        "| sampler | " + " | ".join(f"{a} ({p})" for a, p in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for name, s in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{s.accuracy[c]:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def confusion_markdown(scores: AttributeScores, attribute: Attribute) -> str:
    """The confusion matrix of one attribute: a row per expected value, a column per judged value."""
    values = VALUES[attribute]
    lines = [
        f"| expected ↓ judged → | {' | '.join(values)} |",
        "|---|" + "---|" * len(values),
    ]
    for value, row in zip(values, scores.confusion[attribute], strict=True):
        lines.append(f"| {value} | " + " | ".join(str(int(n)) for n in row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ParaphraseResult:
    """What the classifier saw for one paraphrase prompt's images."""

    prompt: str
    expected: tuple[str, str]
    """(colour, shape) the prompt names."""
    judged: Counter[tuple[str, str]]
    """How many images were judged as each (colour, shape)."""

    @property
    def joint_accuracy(self) -> float:
        return self.judged[self.expected] / sum(self.judged.values())


def paraphrase_probes(seeds_per_prompt: int = 8, first_seed: int = PROBE_SEED + 500_000) -> tuple[list[str], list[int]]:
    """Every `shapes.PARAPHRASES` prompt, `seeds_per_prompt` seeds each: prompts and seeds, prompt-major."""
    prompts = [p for p, _, _ in shapes.PARAPHRASES for _ in range(seeds_per_prompt)]
    return prompts, [first_seed + i for i in range(len(prompts))]


def paraphrase_confusion(model: AttributeClassifier, prompts: list[str], images: np.ndarray) -> list[ParaphraseResult]:
    """Per paraphrase prompt (in `shapes.PARAPHRASES` order), the (colour, shape) the classifier judged each of
    its images to show. `prompts[i]` is the prompt `images[i]` was made for."""
    s, c, _ = predict(model, images)
    results = []
    for prompt, colour, shape in shapes.PARAPHRASES:
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        if idx:
            judged = Counter((shapes.COLOUR_NAMES[c[i]], shapes.SHAPES[s[i]]) for i in idx)
            results.append(ParaphraseResult(prompt, (colour, shape), judged))
    return results


def paraphrase_markdown(results: list[ParaphraseResult]) -> str:
    """Per paraphrase prompt: joint accuracy and what the classifier judged instead, most frequent first."""
    lines = ["| prompt | asks for | joint acc. | judged instead |", "|---|---|---|---|"]
    for r in results:
        wrong = [(k, n) for k, n in r.judged.most_common() if k != r.expected]
        instead = ", ".join(f"{c} {s} ×{n}" for (c, s), n in wrong) or "—"
        lines.append(f"| {r.prompt} | {' '.join(r.expected)} | {r.joint_accuracy:.2f} | {instead} |")
    return "\n".join(lines)
