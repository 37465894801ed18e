"""Judging video streams: shape and colour frame by frame, and motion with a centroid tracker.

Frames are judged by an `AttributeClassifier` trained on clip frames (the video judge). The tracker
finds the shape as the pixels that differ from the background, which it reads off the frame's border
(the median of the outermost ring: the shape covers far less than half of it). Its centre is the
centroid of the shape's coverage of each pixel (colour distance over the shape's full distance), so an
anti-aliased edge counts for what it covers: on real clips a step is measured to within 0.04 px. Frame
to frame, the centre gives the motion: a step per frame along the prompted axis. The shape **turns** at a
frame where that step changes sign next to the wall it was heading for (frame 0's incoming step is the
prompted one, and a turn there needs a short first step). Of the two steps around a turn the shorter
**holds the bounce** (to the wall and back; the other is a full step); the steps that hold none are
clean. A frame's motion is **correct** when its window (the last `SPAN` steps; frame 1 has one)

* holds no bounce, and its displacement (averaged over the window) runs along the prompted axis, has a
  size within the prompted speed's band (`speed_band`: [`SPEED_LOW`, `SPEED_HIGH`] × the speed, and
  nearer it than the other speed), and keeps the expected sign: the prompted one, flipped at each
  turn (a reversal away from the walls is wrong once, and what follows is judged from it); or
* holds a bounce (no speed of its own), each of its steps heads the expected way, and the clean
  steps around it (within `SPAN` + 1 steps either side) have a median size in the band, with no faster
  drift across the axis.

A window with no clean steps around it is wrong: a shape that jitters at a wall shows no speed.
"Next to a wall" is measured on the frame itself: the shape's edge (`wall_gaps`) is within the
distance it covers in `SPAN` frames at the prompted speed (+ half a pixel) of that border. A generated
shape of any size is judged by where it really is, not by the largest radius the data has.
`judge_confusion` measures the rule on streams whose motion is known (real clips).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.evaluation import clips, shapes
from fewstep.evaluation.classifier import AttributeClassifier, predict

SPEED_LOW, SPEED_HIGH = 0.4, 2.5
SPAN = 2
"""Steps a frame's displacement is averaged over: a generated shape may move in uneven whole-pixel
steps (1 and 2 px for 1.5 px per frame)."""
FOREGROUND = 0.3
"""Colour distance (in [-1, 1] units, over RGB) above which a pixel belongs to the shape."""
MIN_AREA = 1.0
"""Foreground weight below which a frame holds no shape: the tracker counts it as wrong."""
PASSING = 0.9
"""Share of its frames (1 on) a stream's motion must have right to count as a right stream in
`judge_confusion`."""


def _distance(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] → (F, H, W) each pixel's colour distance from the background."""
    ring = np.concatenate(
        [frames[:, :, 0, :], frames[:, :, -1, :], frames[:, :, 1:-1, 0], frames[:, :, 1:-1, -1]], axis=2
    )
    bg = np.median(ring, axis=2)[:, :, None, None]
    return np.sqrt(((frames - bg) ** 2).sum(axis=1))


def _foreground(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] → (F, H, W) how much each pixel belongs to the shape, in [0, 1]."""
    return np.clip((_distance(frames) - FOREGROUND) / FOREGROUND, 0.0, 1.0)


def _coverage(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) → (F, H, W) the share of each pixel the shape covers, in [0, 1]: its colour distance
    over the frame's largest, on the foreground and the pixels next to it, 0 elsewhere (so that noise in
    the background does not pull the centre)."""
    dist = _distance(frames)
    fg = np.pad(dist > FOREGROUND, ((0, 0), (1, 1), (1, 1)))
    near = fg[:, 1:-1, 1:-1] | fg[:, :-2, 1:-1] | fg[:, 2:, 1:-1] | fg[:, 1:-1, :-2] | fg[:, 1:-1, 2:]
    full = np.maximum(dist.max(axis=(1, 2)), FOREGROUND)[:, None, None]
    return np.where(near, np.clip(dist / full, 0.0, 1.0), 0.0)


def centroids(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] → (F, 2) shape centre (x, y) in pixels; NaN where no shape is found."""
    _, _, h, w = frames.shape
    weight = _coverage(frames)
    area = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs).sum(axis=(1, 2)) / area
        cy = (weight * ys).sum(axis=(1, 2)) / area
    out = np.stack([cx, cy], axis=1)
    out[_foreground(frames).sum(axis=(1, 2)) < MIN_AREA] = np.nan
    return out


def wall_gaps(frames: np.ndarray) -> np.ndarray:
    """(F, 3, H, W) → (F, 2, 2): pixels between the shape and each border, along x then y, towards 0
    (left, top) then towards the far border (right, bottom); rows and columns with at least half a pixel
    of shape count. NaN where no shape is found."""
    weight = _foreground(frames)
    out = np.full((len(frames), 2, 2), np.nan)
    for i, wgt in enumerate(weight):
        for axis, profile in enumerate((wgt.sum(axis=0), wgt.sum(axis=1))):
            on = np.flatnonzero(profile >= 0.5)
            if len(on):
                out[i, axis] = on[0], len(profile) - 1 - on[-1]
    return out


def speed_band(speed: str, size: int) -> tuple[float, float]:
    """The sizes (px per frame at `size`×`size`) a step may have at `speed`: within [`SPEED_LOW`,
    `SPEED_HIGH`] × the speed, and nearer it than any other of `clips.SPEEDS`."""
    v = clips.SPEEDS[speed]
    low, high = SPEED_LOW * v, SPEED_HIGH * v
    for other in clips.SPEEDS.values():
        # Nearer in pixels: the boundary is the mean (1.25 px between 1 and 1.5 at 16×16). What blurs a
        # measured speed, whole-pixel rendering at 16×16 and the tracker's error, is in pixels whatever the
        # speed, so each speed gets the same margin (0.25 px); the geometric mean (1.22) would give the slow
        # speed less. Real clips measure within 0.04 px of 1 and 1.5: the choice only decides where a
        # model's in-between speed falls.
        if other < v:
            low = max(low, (v + other) / 2)
        elif other > v:
            high = min(high, (v + other) / 2)
    scale = size / shapes.SIZE
    return low * scale, high * scale


def motion_correct(track: np.ndarray, gaps: np.ndarray, direction: str, speed: str, size: int) -> np.ndarray:
    """(F,) bool per frame from the shape's centres `track` and wall gaps `gaps` (`centroids`, `wall_gaps`):
    frame f's motion, from f - 1, is right (frame 0 counts as right when a shape was found). See the
    module docstring for the rule."""
    dx, dy = clips.DIRECTIONS[direction]
    axis = 0 if dx else 1
    sign = dx or dy
    low, high = speed_band(speed, size)
    wall = SPAN * clips.SPEEDS[speed] * size / shapes.SIZE + 0.5
    n = len(track)
    step = np.full(n + 1, np.nan)  # step[k]: frame k - 1 → k along the axis; step[n] is not seen yet
    step[0] = sign
    step[1:n] = np.diff(track[:, axis])
    heading = np.sign(step)  # a step of 0 (at the wall) keeps the heading of the step before it
    for k in map(int, np.flatnonzero(heading == 0)):
        heading[k] = heading[k - 1]
    with np.errstate(invalid="ignore"):
        ahead = np.where(heading[:n] > 0, gaps[:, axis, 1], gaps[:, axis, 0])  # the wall it heads for
        # A turn at frame n - 1 cannot be seen: its last step may hold a bounce.
        turn = ((heading[:n] != heading[1:]) | np.isnan(step[1:])) & (ahead <= wall)
        # Frame 0's incoming step is the prompt's: a full step the other way is a wrong start, not a
        # bounce; to the wall and back inside the first step leaves a short one.
        turn[0] &= bool(abs(step[1]) < low)
    # Of the steps into and out of a turn, the bounce (to the wall and back) is in the shorter one: the
    # other is a full step. A shape in a room two steps wide turns at every frame and keeps full steps.
    holds_bounce = np.zeros(n, dtype=bool)
    for k in map(int, np.flatnonzero(turn)):
        if k == 0:  # the step into frame 0 is not seen
            into = False
        elif k == n - 1 or np.isnan(step[k + 1]):  # nor the step out of the last frame
            into = True
        else:
            into = bool(abs(step[k]) <= abs(step[k + 1]))
        holds_bounce[k if into else k + 1] = True
    clean = ~holds_bounce & ~np.isnan(step[:n])
    clean[0] = False
    ok = np.zeros(n, dtype=bool)
    ok[0] = not np.isnan(track[0]).any()
    expected = np.zeros(n)  # the sign each step should have, as judged when it is reached
    for f in range(1, n):
        if turn[f - 1] and not np.isnan(heading[f]):
            sign = int(heading[f])  # a bounce: the shape leaves the wall the other way
        expected[f] = sign
        span = min(f, SPAN)
        d = (track[f] - track[f - span]) / span
        if np.isnan(d).any():
            continue
        along, across = d[axis], d[1 - axis]
        window = slice(f - span + 1, f + 1)
        if holds_bounce[window].any():
            # To the wall and back: no speed of its own, and at 16×16 a quick shape bounces every 3–6
            # frames. Its speed is that of the clean steps around it (the median: a step at the stream's
            # end may hold a bounce no one can see), and each of its steps heads the way expected of it.
            near = slice(max(1, f - span - SPAN), f + SPAN + 2)
            around = step[:n][near][clean[near]]
            heads, wanted = heading[window], expected[window]
            if (heads[~np.isnan(heads)] == wanted[~np.isnan(heads)]).all():
                if len(around):
                    v = float(np.median(np.abs(around)))
                    ok[f] = low <= v <= high and abs(across) <= v
            elif heading[f] == -sign:
                sign = -sign  # a reversal away from the walls, as below
            continue
        if abs(along) < abs(across) or not low <= abs(along) <= high:
            continue
        if np.sign(along) == sign:
            ok[f] = True
        elif f > 1:
            sign = int(np.sign(along))  # a reversal mid-field is wrong once; judge what follows from it
    return ok


def judge_confusion(videos: np.ndarray, targets: list[clips.Clip]) -> dict[str, dict[str, float]]:
    """How `motion_correct` judges (N, F, 3, H, W) streams whose true motion `targets` is known (real
    clips), per true speed: the share of frames 1 on judged right when the prompt names the true motion
    (`prompted`), the other speed (`other_speed`), the perpendicular direction (`other_axis`) or the
    opposite one (`reversed`); `reversed_frame_1` is frame 1 alone under the opposite direction (after
    its first bounce a reversed clip moves as a prompted one, so only its start can be wrong); and
    `streams_*` the share of streams with at least `PASSING` of their frames right; `streams` counts them."""
    size = videos.shape[-1]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    turned = {"left": "up", "right": "down", "up": "left", "down": "right"}
    judged = [(centroids(v), wall_gaps(v), c) for v, c in zip(videos, targets, strict=True)]
    out: dict[str, dict[str, float]] = {}
    for speed in clips.SPEED_NAMES:
        mine = [(t, g, c) for t, g, c in judged if c.speed == speed]
        if not mine:
            continue
        (other,) = (s for s in clips.SPEED_NAMES if s != speed)
        prompts = {
            "prompted": [(c.direction, c.speed) for _, _, c in mine],
            "other_speed": [(c.direction, other) for _, _, c in mine],
            "other_axis": [(turned[c.direction], c.speed) for _, _, c in mine],
            "reversed": [(opposite[c.direction], c.speed) for _, _, c in mine],
        }
        row: dict[str, float] = {"streams": len(mine)}
        for name, prompted in prompts.items():
            ok = np.stack([motion_correct(t, g, *p, size) for (t, g, _), p in zip(mine, prompted, strict=True)])
            ok = ok[:, 1:]
            row[name] = float(ok.mean())
            if name in ("prompted", "other_speed"):
                row[f"streams_{name}"] = float((ok.mean(axis=1) >= PASSING).mean())
            if name == "reversed":
                row["reversed_frame_1"] = float(ok[:, 0].mean())
        out[speed] = row
    return out


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
