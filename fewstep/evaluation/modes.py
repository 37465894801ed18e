"""Where the modes of the shapes world live, read from pixels: background colour, the shape's position and size.

The attribute classifier judges what a prompt names (shape, colour); it is blind to what a prompt leaves to
the seed. A sampler that always draws a gray background, or always centres its shape, scores as well as
one that draws every background and position the data has. These statistics read those modes off the
pixels, with no network, so they also judge the judge's blind spots:

* **background**: the median colour of the image's outermost ring (a shape covers far less than half of
  it), named by the nearest of the data's backgrounds;
* **shape mask**: pixels farther than `MASK_DISTANCE` from that background colour; its centroid is the
  shape's **position**, the square root of its area per π its **size** (the radius of a disc of that area);
* **pixel diversity**: the mean RMS distance between every two images of a set, in [0, 1] pixel units.

`describe` reduces a set of images made for one prompt (many seeds) to those statistics; `tv_distance`
compares two background mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.evaluation import shapes

MASK_DISTANCE = 0.25
"""Euclidean RGB distance in [0, 1] units from the background beyond which a pixel belongs to the shape: the
backgrounds' jitter is 0.04 per channel, the nearest colour–background pair is 0.46 apart."""


def to_unit(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → the same in [0, 1] (clamped), float64."""
    return np.clip((images.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def border_colour(unit: np.ndarray) -> np.ndarray:
    """(N, 3): the per-channel median of each image's outermost ring of pixels."""
    ring = np.concatenate([unit[:, :, 0, :], unit[:, :, -1, :], unit[:, :, 1:-1, 0], unit[:, :, 1:-1, -1]], axis=2)
    return np.median(ring, axis=2)


def background_index(unit: np.ndarray) -> np.ndarray:
    """(N,) index into `shapes.BACKGROUND_NAMES` of each image's nearest background colour."""
    refs = np.array([shapes.BACKGROUNDS[n] for n in shapes.BACKGROUND_NAMES])
    border = border_colour(unit)
    return np.argmin(((border[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)


def shape_mask(unit: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the pixels that differ from their image's background by more than `MASK_DISTANCE`."""
    border = border_colour(unit)
    return np.sqrt(((unit - border[:, :, None, None]) ** 2).sum(1)) > MASK_DISTANCE


def geometry(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) centroid (x, y) in pixels of each image's shape mask (the image centre where it is empty) and
    (N,) its size: sqrt(area / π), the radius of a disc of the same area (0 for an empty mask)."""
    mask = shape_mask(unit)
    _, h, w = mask.shape
    area = mask.sum((1, 2)).astype(np.float64)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    safe = np.maximum(area, 1.0)
    cx = np.where(area > 0, (mask * xs).sum((1, 2)) / safe, w / 2)
    cy = np.where(area > 0, (mask * ys).sum((1, 2)) / safe, h / 2)
    return np.stack([cx, cy], axis=1), np.sqrt(area / np.pi)


def pixel_diversity(unit: np.ndarray) -> float:
    """Mean RMS distance between every two images, in [0, 1] pixel units."""
    flat = unit.reshape(len(unit), -1)
    sq = (flat**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0.0) / flat.shape[1]
    n = len(flat)
    return float(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean())


@dataclass(frozen=True)
class Modes:
    """The modes of one set of images (one prompt, many seeds)."""

    background: tuple[float, ...]
    """Share of each of `shapes.BACKGROUND_NAMES`."""
    position_spread: float
    """RMS distance of the shape's centroid from the set's mean centroid, in pixels."""
    size_mean: float
    size_spread: float
    """Mean and standard deviation of the shape's size (disc-equivalent radius, pixels)."""
    pixel_diversity: float

    def as_dict(self) -> dict[str, float]:
        return {
            **{f"bg_{n}": s for n, s in zip(shapes.BACKGROUND_NAMES, self.background, strict=True)},
            "position_spread": self.position_spread,
            "size_mean": self.size_mean,
            "size_spread": self.size_spread,
            "pixel_diversity": self.pixel_diversity,
        }


def describe(images: np.ndarray) -> Modes:
    """The modes of (N, 3, H, W) images in [-1, 1] made for one prompt; N ≥ 2."""
    if len(images) < 2:
        raise ValueError(f"modes need at least 2 images. Given: {len(images)}")
    unit = to_unit(images)
    bg = np.bincount(background_index(unit), minlength=len(shapes.BACKGROUND_NAMES)) / len(unit)
    centre, size = geometry(unit)
    spread = float(np.sqrt(((centre - centre.mean(0)) ** 2).sum(1).mean()))
    return Modes(
        background=tuple(float(s) for s in bg),
        position_spread=spread,
        size_mean=float(size.mean()),
        size_spread=float(size.std()),
        pixel_diversity=pixel_diversity(unit),
    )


def mean_modes(sets: list[Modes]) -> Modes:
    """The average of several prompts' modes (each prompt weighs the same)."""
    return Modes(
        background=tuple(float(v) for v in np.mean([m.background for m in sets], axis=0)),
        position_spread=float(np.mean([m.position_spread for m in sets])),
        size_mean=float(np.mean([m.size_mean for m in sets])),
        size_spread=float(np.mean([m.size_spread for m in sets])),
        pixel_diversity=float(np.mean([m.pixel_diversity for m in sets])),
    )


def tv_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Total-variation distance between two background mixes: half the sum of absolute share differences."""
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())
