"""Judging video streams: a frame classifier for shape and colour, and a centroid tracker for motion.

The frame classifier is the image judge's network (`classifier.AttributeClassifier`, whose max
pooling makes it size-agnostic) trained on single frames of procedural clips at the video size,
at random points of their motion, with the same noise and blur augmentation.

The tracker finds the shape as the pixels that differ from the background, which it reads off
the frame's border (the median of the outermost ring: the shape covers far less than half of
it). Its centroid, frame to frame, gives the motion. A frame's motion is **correct** when its
displacement (per frame, averaged over the last `SPAN` frames)

* runs along the prompted axis (left/right is horizontal, up/down vertical),
* has a size within [`SPEED_LOW`, `SPEED_HIGH`] × the prompted speed (or, next to a wall, is
  shorter than that in any direction: a bounce inside one frame goes to the wall and back), and
* keeps its sign, or flips it only next to the wall it would bounce off (the first
  displacement must have the prompted sign).

"Next to a wall" is measured on the frame itself: the shape's edge (`wall_gaps`) is within the
distance it covers in `SPAN` frames (+ half a pixel) of the border along the axis of motion. A
generated shape of any size is judged by where it really is, not by the largest radius the data has.

This holds through bounces without knowing where a generated shape is meant to be. On real
clips it scores `real_motion_accuracy` (reported beside the models as the ceiling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.trainer import clips, shapes
from fewstep.trainer.classifier import AttributeClassifier, judge, train_classifier

SPEED_LOW, SPEED_HIGH = 0.4, 2.5
SPAN = 2
"""Frames the displacement is averaged over: a 16×16 shape's centroid moves in uneven steps."""
FOREGROUND = 0.3
"""Colour distance (in [-1, 1] units, over RGB) above which a pixel belongs to the shape."""
MIN_AREA = 1.0
"""Foreground weight below which a frame holds no shape: the tracker counts it as wrong."""


def _frame_batch(seed: int, index: int, n: int, size: int) -> tuple[np.ndarray, list[clips.Clip]]:
    """`n` single frames of random clips, each at a random time of its motion (bounces included)."""
    rng = np.random.default_rng([seed, index, 11])
    batch = clips.sample_clips(rng, n)
    at = rng.integers(0, 48, size=n)
    frames = np.stack([clips.render(c, int(f) + 1, rng, size)[f] for c, f in zip(batch, at, strict=True)])
    return frames, batch


def train_frame_classifier(seed: int, steps: int, size: int) -> AttributeClassifier:
    """The video judge: shape and colour from one frame."""

    def frames(step: int, n: int) -> tuple[np.ndarray, list[shapes.Scene]]:
        x, batch = _frame_batch(seed + 7919, step, n, size)
        return x, [c.scene for c in batch]

    return train_classifier(seed, steps, data=frames, label="video judge step")


def _foreground(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] → (F, H, W) how much each pixel belongs to the shape, in [0, 1]."""
    ring = np.concatenate(
        [frames[:, :, 0, :], frames[:, :, -1, :], frames[:, :, 1:-1, 0], frames[:, :, 1:-1, -1]], axis=2
    )
    bg = np.median(ring, axis=2)[:, :, None, None]
    dist = np.sqrt(((frames - bg) ** 2).sum(axis=1))
    return np.clip((dist - FOREGROUND) / FOREGROUND, 0.0, 1.0)


def centroids(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] → (F, 2) shape centre (x, y) in pixels; NaN where no shape is found."""
    _, _, h, w = frames.shape
    weight = _foreground(frames)
    area = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs).sum(axis=(1, 2)) / area
        cy = (weight * ys).sum(axis=(1, 2)) / area
    out = np.stack([cx, cy], axis=1)
    out[area < MIN_AREA] = np.nan
    return out


def wall_gaps(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) → (F, 2): pixels between the shape and the nearest border, along x and along y
    (rows and columns with at least half a pixel of shape count); NaN where no shape is found."""
    weight = _foreground(frames)
    out = np.full((len(frames), 2), np.nan)
    for i, wgt in enumerate(weight):
        for axis, profile in enumerate((wgt.sum(axis=0), wgt.sum(axis=1))):
            on = np.flatnonzero(profile >= 0.5)
            if len(on):
                out[i, axis] = min(on[0], len(profile) - 1 - on[-1])
    return out


def motion_correct(track: np.ndarray, gaps: np.ndarray, direction: str, speed: str, size: int) -> np.ndarray:
    """(F,) bool per frame from the shape's centres `track` and wall gaps `gaps` (`centroids`, `wall_gaps`):
    frame f's displacement from f - 1 is right (frame 0 counts as right when a shape was found). See the
    module docstring for the rule."""
    dx, dy = clips.DIRECTIONS[direction]
    axis = 0 if dx else 1
    sign = dx or dy
    expected = clips.SPEEDS[speed] * size / shapes.SIZE
    wall = SPAN * expected + 0.5
    ok = np.zeros(len(track), dtype=bool)
    ok[0] = not np.isnan(track[0]).any()
    short = False
    for f in range(1, len(track)):
        span = min(f, SPAN)
        d = (track[f] - track[f - span]) / span
        if np.isnan(d).any():
            continue
        along, across = d[axis], d[1 - axis]
        near_wall = bool(gaps[f - 1][axis] <= wall)
        if near_wall and np.hypot(along, across) < SPEED_LOW * expected:
            # A bounce inside the frame goes to the wall and back: one short net step, not two.
            ok[f] = not short
            short = True
            continue
        short = False
        if abs(along) < abs(across) or not SPEED_LOW * expected <= abs(along) <= SPEED_HIGH * expected:
            continue
        if np.sign(along) == sign or along == 0:
            ok[f] = True
        elif near_wall and f > 1:
            ok[f] = True  # a bounce
            sign = -sign
        elif f > 1:
            sign = int(np.sign(along))  # a reversal mid-field is wrong once; judge what follows from it
    return ok


@dataclass
class StreamScores:
    """Per-frame correctness over a set of streams: (streams, frames) bool arrays."""

    shape: np.ndarray
    colour: np.ndarray
    motion: np.ndarray

    def window(self, start: int, stop: int) -> dict[str, float]:
        """Mean accuracies over frames [start, stop) (0-based) of every stream."""
        s, c, m = (a[:, start:stop] for a in (self.shape, self.colour, self.motion))
        return {
            "shape": float(s.mean()),
            "colour": float(c.mean()),
            "joint": float((s & c).mean()),
            "motion": float(m.mean()),
        }


def score_streams(model: AttributeClassifier, videos: np.ndarray, targets: list[clips.Clip]) -> StreamScores:
    """Judge (N, F, 3, H, W) streams against the clips they were prompted with."""
    n, nf = videos.shape[:2]
    size = videos.shape[-1]
    ps, pc, _ = judge(model, videos.reshape(n * nf, *videos.shape[2:]))
    ys, yc = shapes.labels([c.scene for c in targets])
    motion = np.stack(
        [
            motion_correct(centroids(v), wall_gaps(v), c.direction, c.speed, size)
            for v, c in zip(videos, targets, strict=True)
        ]
    )
    return StreamScores(ps.reshape(n, nf) == ys[:, None], pc.reshape(n, nf) == yc[:, None], motion)


def real_streams(seed: int, n: int, frames: int, size: int) -> tuple[np.ndarray, list[clips.Clip]]:
    """`n` real clips of `frames` frames: the ceiling every generated stream is judged against."""
    rng = np.random.default_rng([seed, 104729])
    targets = clips.sample_clips(rng, n)
    return np.stack([clips.render(c, frames, rng, size) for c in targets]), targets
