"""Procedural captioned clips: one shape moving across a plain background, bouncing off the walls.

The video data set. A clip is a `shapes.Scene` plus a motion: a direction (left,
right, up, down) and a speed (slowly, quickly), in pixels per frame. The shape moves in a
straight line and bounces off the frame's edges (its velocity flips on the axis it hit), so a
stream of any length stays inside the frame and keeps its speed. Captions name colour, shape,
direction and speed; `motion` gives the true direction at every frame, after bounces, for
judging drift in long streams.

Frames are drawn with the image data set's anti-aliased renderer at 32×32 (`size=16` averages
2×2 blocks: a quarter of the tokens per frame, for CPU training). The colour jitter is drawn
once per clip, so frames do not flicker. Everything comes from a seeded numpy Generator: a
(seed, batch index) pair always gives the same clips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fewstep.evaluation import shapes

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
SPEEDS: dict[str, float] = {"slowly": 2.0, "quickly": 3.0}
"""Pixels per frame at 32×32: whole pixels at 16×16. At sub-pixel speeds (0.375 and 0.75 px per 16×16 frame)
no model learned any motion in this CPU budget (docs/decisions/video-quality.md)."""
SPEED_NAMES: tuple[str, ...] = tuple(SPEEDS)
MIN_RADIUS, MAX_RADIUS = shapes.MIN_RADIUS, shapes.MAX_RADIUS
"""The still images' sizes: a stream's first frame is the image student's (image to video), and the
video student must continue any shape that model draws."""

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {c} {s} moving {d} {v}",
    "a {c} {s} sliding {d} {v}",
    "{c} {s} going {d} {v}",
    "a {c} {s} on a {bg} background moving {d} {v}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = ("a video of a {c} {s} that moves {d} {v}",)


@dataclass(frozen=True)
class Clip:
    """The attributes of one clip: its first frame and its motion."""

    scene: shapes.Scene
    direction: str
    speed: str

    def track(self, frames: int) -> np.ndarray:
        """(frames, 4): centre x, centre y and velocity x, y at every frame, bounces included."""
        s = self.scene
        dx, dy = DIRECTIONS[self.direction]
        v = SPEEDS[self.speed]
        x, y, vx, vy = s.cx, s.cy, dx * v, dy * v
        lo, hi = s.radius + 0.5, shapes.SIZE - s.radius - 0.5
        out = np.empty((frames, 4))
        for f in range(frames):
            out[f] = (x, y, vx, vy)
            x, vx = bounce(x + vx, vx, lo, hi)
            y, vy = bounce(y + vy, vy, lo, hi)
        return out

    def motion(self, frames: int) -> list[str]:
        """The true direction of motion at every frame (it flips at each bounce)."""
        names = {v: k for k, v in DIRECTIONS.items()}
        return [names[(int(np.sign(vx)), int(np.sign(vy)))] for _, _, vx, vy in self.track(frames)]


def bounce(p: float, v: float, lo: float, hi: float) -> tuple[float, float]:
    """Reflect a position that left [lo, hi] back inside, and flip its velocity."""
    if p < lo:
        return 2 * lo - p, -v
    if p > hi:
        return 2 * hi - p, -v
    return p, v


def sample_clips(rng: np.random.Generator, n: int) -> list[Clip]:
    """`n` random clips; the shape starts fully inside the frame."""
    clips = []
    for scene in shapes.sample_scenes(rng, n):
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        lo, hi = r + 1.0, shapes.SIZE - r - 1.0
        scene = replace(scene, radius=r, cx=float(rng.uniform(lo, hi)), cy=float(rng.uniform(lo, hi)))
        clips.append(
            Clip(scene, DIRECTION_NAMES[rng.integers(len(DIRECTIONS))], SPEED_NAMES[rng.integers(len(SPEEDS))])
        )
    return clips


def render(clip: Clip, frames: int, rng: np.random.Generator, size: int = shapes.SIZE) -> np.ndarray:
    """(frames, 3, size, size) float32 in [-1, 1]."""
    if shapes.SIZE % size:
        raise ValueError(f"size must divide {shapes.SIZE}. Given: {size}")
    s = clip.scene
    fg = np.clip(np.array(shapes.COLOURS[s.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)[:, None, None]
    bg = np.clip(np.array(shapes.BACKGROUNDS[s.background]) + rng.uniform(-0.04, 0.04, 3), 0, 1)[:, None, None]
    k = shapes.SIZE // size
    out = np.empty((frames, 3, size, size), dtype=np.float32)
    for f, (x, y, _, _) in enumerate(clip.track(frames)):
        a = shapes.coverage(replace(s, cx=float(x), cy=float(y)))
        a = a.reshape(size, k, size, k).mean(axis=(1, 3))[None]
        out[f] = (a * fg + (1 - a) * bg) * 2.0 - 1.0
    return out


def caption(clip: Clip, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    s = clip.scene
    template = templates[rng.integers(len(templates))]
    return template.format(
        c=rng.choice(shapes.TRAIN_COLOUR_WORDS[s.colour]),
        s=rng.choice(shapes.TRAIN_SHAPE_WORDS[s.shape]),
        bg=s.background,
        d=clip.direction,
        v=clip.speed,
    )


def batch(
    seed: int, index: int, n: int, frames: int, size: int = shapes.SIZE
) -> tuple[np.ndarray, list[Clip], list[str]]:
    """Batch `index` of the infinite data set: (n, frames, 3, size, size) clips, their attributes and captions."""
    rng = np.random.default_rng([seed, index, 7])
    clips = sample_clips(rng, n)
    video = np.stack([render(c, frames, rng, size) for c in clips])
    return video, clips, [caption(c, rng) for c in clips]
