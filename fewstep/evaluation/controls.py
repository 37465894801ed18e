"""Negative controls and graded corruptions: evidence that the attribute classifier can fail.

A judge that scores every sampler 0.99 is only informative if it also scores a bad image low. These
controls take fresh real procedural images with known labels and score, against the ORIGINAL labels,

* **controls** (no strength): the bare background with no shape, the mean of many real images, the same
  scene re-rendered in another colour, and in another shape. Each must score at most `LOW` joint accuracy
  (chance is 1/20 for the blank and the mean; 0 for a correct judge on the re-rendered ones);
* **graded corruptions** (rising strength): a worn shape (a share of its covered pixels set to the
  background), Gaussian blur, additive Gaussian noise, and a colour shift (the shape's colour moved part of
  the way toward another colour). Each must fall (non-increasing, up to sampling noise) with strength, score
  at least `HIGH` at its mildest level and at most `LOW` at its strongest.

Each row reports joint accuracy (shape and colour both right) and the mean joint probability the judge gives
the original label (the product of the two heads' softmax probabilities).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from fewstep.evaluation import shapes
from fewstep.evaluation.classifier import AttributeClassifier

LOW = 0.2
"""Joint accuracy at or below which an image set counts as judged wrong: chance is 1/20 (4 shapes × 5 colours),
and shape alone at chance with colour still right gives 1/4."""
HIGH = 0.9
"""Joint accuracy at or above which a corruption's mildest level counts as still judged right."""
MEAN_IMAGES = 1000
"""Real images averaged into the mean-image control."""


@dataclass(frozen=True)
class RealSet:
    """Fresh real images and what was drawn: the material every control and corruption starts from."""

    images: np.ndarray
    """(N, 3, 32, 32) in [-1, 1]."""
    scenes: list[shapes.Scene]
    coverage: np.ndarray
    """(N, 32, 32): the share of each pixel the shape covers."""
    seed: int

    @property
    def background(self) -> np.ndarray:
        """(N, 3, 1, 1) each image's own (jittered) background colour in [-1, 1]: the corner pixel, which a
        shape never covers (shapes keep a margin of at least one pixel inside the frame)."""
        return self.images[:, :, :1, :1]

    def rng(self, name: str) -> np.random.Generator:
        """A generator of its own for each control, so that adding one changes no other."""
        return np.random.default_rng([self.seed, *name.encode()])


def real_set(seed: int, n: int) -> RealSet:
    """`n` fresh real images drawn from `seed`."""
    rng = np.random.default_rng([seed, 31337])
    scenes = shapes.sample_scenes(rng, n)
    images = shapes.render(scenes, rng)
    return RealSet(images, scenes, np.stack([shapes.coverage(s) for s in scenes]), seed)


def _other(names: tuple[str, ...], own: list[str], rng: np.random.Generator) -> list[str]:
    """For each of `own`, a uniformly drawn different name from `names`."""
    return [names[(names.index(o) + 1 + int(rng.integers(len(names) - 1))) % len(names)] for o in own]


def blank(real: RealSet) -> np.ndarray:
    """Each image's background with no shape."""
    return np.broadcast_to(real.background, real.images.shape).astype(np.float32)


def mean_image(real: RealSet) -> np.ndarray:
    """The mean of `MEAN_IMAGES` other real images, once per label."""
    rng = real.rng("mean image")
    mean = shapes.render(shapes.sample_scenes(rng, MEAN_IMAGES), rng).mean(0, keepdims=True)
    return np.repeat(mean, len(real.images), axis=0).astype(np.float32)


def wrong_colour(real: RealSet) -> np.ndarray:
    """The same scenes (shape, place, size, background) rendered in another colour."""
    rng = real.rng("wrong colour")
    others = _other(shapes.COLOUR_NAMES, [s.colour for s in real.scenes], rng)
    return shapes.render([replace(s, colour=c) for s, c in zip(real.scenes, others, strict=True)], rng)


def wrong_shape(real: RealSet) -> np.ndarray:
    """The same scenes (colour, place, size, background) rendered as another shape."""
    rng = real.rng("wrong shape")
    others = _other(shapes.SHAPES, [s.shape for s in real.scenes], rng)
    return shapes.render([replace(s, shape=k) for s, k in zip(real.scenes, others, strict=True)], rng)


def worn(real: RealSet, share: float) -> np.ndarray:
    """A random `share` of the pixels the shape touches set to the background."""
    rng = real.rng(f"worn {share}")
    drop = (real.coverage > 0) & (rng.random(real.coverage.shape) < share)
    return np.where(drop[:, None], real.background, real.images).astype(np.float32)


def blur(real: RealSet, sigma: float) -> np.ndarray:
    """Gaussian blur of `sigma` pixels (edges extended)."""
    return gaussian_filter(real.images, (0, 0, sigma, sigma), mode="nearest").astype(np.float32)


def noise(real: RealSet, sigma: float) -> np.ndarray:
    """Additive Gaussian noise of `sigma` in [-1, 1] units, clipped back to [-1, 1]."""
    rng = real.rng(f"noise {sigma}")
    return np.clip(real.images + sigma * rng.standard_normal(real.images.shape), -1, 1).astype(np.float32)


def colour_shift(real: RealSet, share: float) -> np.ndarray:
    """The shape's colour moved `share` of the way toward a random other colour (1 would be that colour)."""
    rng = real.rng(f"colour shift {share}")
    own = np.array([shapes.COLOURS[s.colour] for s in real.scenes])
    other = np.array([shapes.COLOURS[c] for c in _other(shapes.COLOUR_NAMES, [s.colour for s in real.scenes], rng)])
    step = 2.0 * share * (other - own)[:, :, None, None]  # × 2: [0, 1] colours on the [-1, 1] scale
    return (real.images + real.coverage[:, None] * step).astype(np.float32)


CONTROLS: dict[str, Callable[[RealSet], np.ndarray]] = {
    "blank (background only)": blank,
    "mean image": mean_image,
    "wrong colour": wrong_colour,
    "wrong shape": wrong_shape,
}
"""Images that must not be judged as their original label."""

CORRUPTIONS: dict[str, tuple[Callable[[RealSet, float], np.ndarray], tuple[float, ...]]] = {
    "worn shape (share of pixels)": (worn, (0.2, 0.4, 0.6, 0.8, 0.95)),
    "blur (σ, px)": (blur, (1.0, 2.0, 4.0, 8.0, 16.0)),
    "noise (σ, [-1, 1] units)": (noise, (0.25, 0.5, 1.0, 1.5, 2.0)),
    "colour shift (share)": (colour_shift, (0.2, 0.35, 0.5, 0.65, 0.8)),
}
"""Corruptions and their strengths, mildest first. Blur needs σ = 16 px (half the frame) before shape and colour
are both lost: a blurred blob keeps its colour, so joint accuracy stalls near the shape head's chance of 1/4
until the blob dissolves into the background."""


@dataclass(frozen=True)
class ControlRow:
    """How the judge scored one control, or one corruption at one strength, against the original labels."""

    name: str
    strength: float | None
    """None for a control."""
    joint_accuracy: float
    joint_probability: float
    """Mean over images of P(original shape) × P(original colour)."""
    shape_accuracy: float
    colour_accuracy: float


@torch.inference_mode()
def _probabilities(model: AttributeClassifier, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, ...]:
    """Softmax probabilities of the shape head (N, 4) and the colour head (N, 5)."""
    ps, pc = [], []
    for i in range(0, len(images), batch_size):
        ls, lc = model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).float())
        ps.append(ls.softmax(1).numpy())
        pc.append(lc.softmax(1).numpy())
    return np.concatenate(ps), np.concatenate(pc)


def score(
    model: AttributeClassifier, images: np.ndarray, real: RealSet, name: str, strength: float | None = None
) -> ControlRow:
    """Score `images` (one per image of `real`) against `real`'s labels."""
    ps, pc = _probabilities(model, images)
    ys, yc = shapes.labels(real.scenes)
    idx = np.arange(len(images))
    shape_ok, colour_ok = ps.argmax(1) == ys, pc.argmax(1) == yc
    return ControlRow(
        name=name,
        strength=strength,
        joint_accuracy=float((shape_ok & colour_ok).mean()),
        joint_probability=float((ps[idx, ys] * pc[idx, yc]).mean()),
        shape_accuracy=float(shape_ok.mean()),
        colour_accuracy=float(colour_ok.mean()),
    )


def control_rows(model: AttributeClassifier, seed: int, n: int = 300) -> list[ControlRow]:
    """The real images themselves (first row), every control, then every corruption at every strength."""
    real = real_set(seed, n)
    rows = [score(model, real.images, real, "real images")]
    rows += [score(model, make(real), real, name) for name, make in CONTROLS.items()]
    for name, (corrupt, strengths) in CORRUPTIONS.items():
        rows += [score(model, corrupt(real, s), real, name, s) for s in strengths]
    return rows


def controls_markdown(rows: list[ControlRow]) -> str:
    """`rows` as a markdown table."""
    lines = [
        "| image set | strength | joint acc. | P(original label) | shape acc. | colour acc. |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        strength = "—" if r.strength is None else f"{r.strength:g}"
        lines.append(
            f"| {r.name} | {strength} | {r.joint_accuracy:.3f} | {r.joint_probability:.3f} | "
            f"{r.shape_accuracy:.3f} | {r.colour_accuracy:.3f} |"
        )
    return "\n".join(lines)
