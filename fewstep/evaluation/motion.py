"""Judging video streams: shape and colour frame by frame, and motion with a centroid tracker.

Frames are judged by an `AttributeClassifier` trained on clip frames (the video judge). The tracker
finds the shape as the pixels that differ from the background, which it reads off the frame's border
(the median of the outermost ring: the shape covers far less than half of it). Its centroid, frame to
frame, gives the motion. A frame's motion is **correct** when its displacement (per frame, averaged
over the last `SPAN` frames)

* runs along the prompted axis (left/right is horizontal, up/down vertical),
* has a size within [`SPEED_LOW`, `SPEED_HIGH`] × the prompted speed (or, next to a wall, is
  shorter than that in any direction: a bounce inside one frame goes to the wall and back), and
* keeps its sign, or flips it only next to the wall it would bounce off (the first
  displacement must have the prompted sign).

"Next to a wall" is measured on the frame itself: the shape's edge (`wall_gaps`) is within the
distance it covers in `SPAN` frames (+ half a pixel) of the border along the axis of motion. A
generated shape of any size is judged by where it really is, not by the largest radius the data has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.evaluation import clips, shapes
from fewstep.evaluation.classifier import AttributeClassifier, predict

SPEED_LOW, SPEED_HIGH = 0.4, 2.5
SPAN = 2
"""Frames the displacement is averaged over: a 16×16 shape's centroid moves in uneven steps."""
FOREGROUND = 0.3
"""Colour distance (in [-1, 1] units, over RGB) above which a pixel belongs to the shape."""
MIN_AREA = 1.0
"""Foreground weight below which a frame holds no shape: the tracker counts it as wrong."""


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
    ps, pc, _ = predict(model, videos.reshape(n * nf, *videos.shape[2:]))
    ys, yc = shapes.labels([c.scene for c in targets])
    motion = np.stack(
        [
            motion_correct(centroids(v), wall_gaps(v), c.direction, c.speed, size)
            for v, c in zip(videos, targets, strict=True)
        ]
    )
    return StreamScores(ps.reshape(n, nf) == ys[:, None], pc.reshape(n, nf) == yc[:, None], motion)
