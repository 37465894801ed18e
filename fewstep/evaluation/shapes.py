"""Procedural captioned shapes: the reference image data set.

One shape per 32×32 RGB scene, drawn anti-aliased (4× supersampling) on a plain background.
Every attribute is sampled from a seeded numpy Generator, so a (seed, batch index) pair
always gives the same batch: the data set is infinite, deterministic and needs no files.

Captions come from several templates and a few synonyms per word, so the denoiser learns a
region of the text encoder's space rather than one token per attribute. Evaluation uses
templates (`HELDOUT_TEMPLATES`) and words (`PARAPHRASES`) that never occur in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.18),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.78),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.45, 0.45, 0.45),
    "white": (0.92, 0.92, 0.92),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

TRAIN_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "ruby", "cherry"),
    "green": ("green", "jade", "grass green"),
    "blue": ("blue", "sapphire", "sky blue"),
    "yellow": ("yellow", "lemon", "canary"),
    "purple": ("purple", "violet", "lavender"),
}
TRAIN_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid"),
    "cross": ("cross", "plus sign", "plus"),
}
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "{c} {s}",
    "a {c} {s} on a {bg} background",
    "a {size} {c} {s}",
    "a {c} {s} in the {pos}",
    "a picture of a {c} {s}",
    "one {size} {c} {s} on {bg}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image showing a {c} {s}",
    "there is a {c} {s} here",
)
# Words never used in training captions: (prompt, colour, shape).
PARAPHRASES: tuple[tuple[str, str, str], ...] = (
    ("a crimson disc", "red", "circle"),
    ("a scarlet round shape", "red", "circle"),
    ("an emerald tile", "green", "square"),
    ("an azure disc", "blue", "circle"),
    ("a cobalt three-sided shape", "blue", "triangle"),
    ("a golden tile", "yellow", "square"),
    ("a mustard arrowhead", "yellow", "triangle"),
    ("a plum crossing of two bars", "purple", "cross"),
    ("a mauve round shape", "purple", "circle"),
    ("a crimson arrowhead", "red", "triangle"),
)

SIZE = 32
_SUPER = 4
MIN_RADIUS, MAX_RADIUS = 6.0, 11.0


@dataclass(frozen=True)
class Scene:
    """The attributes of one image."""

    shape: str
    colour: str
    background: str
    radius: float
    cx: float
    cy: float

    @property
    def size_word(self) -> str:
        return "small" if self.radius < (MIN_RADIUS + MAX_RADIUS) / 2 else "large"

    @property
    def position_word(self) -> str:
        v = "top" if self.cy < SIZE / 3 else "bottom" if self.cy > 2 * SIZE / 3 else ""
        h = "left" if self.cx < SIZE / 3 else "right" if self.cx > 2 * SIZE / 3 else ""
        return f"{v} {h}".strip() or "center"


def sample_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """`n` random scenes; the shape always lies fully inside the frame."""
    scenes = []
    for _ in range(n):
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        lo, hi = r + 1.0, SIZE - r - 1.0
        scenes.append(
            Scene(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                background=BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))],
                radius=r,
                cx=float(rng.uniform(lo, hi)),
                cy=float(rng.uniform(lo, hi)),
            )
        )
    return scenes


def coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (32, 32) in [0, 1]."""
    n = SIZE * _SUPER
    coords = (np.arange(n) + 0.5) / _SUPER
    x = (coords[None, :] - scene.cx) / scene.radius
    y = (coords[:, None] - scene.cy) / scene.radius
    if scene.shape == "circle":
        inside = x**2 + y**2 <= 1.0
    elif scene.shape == "square":
        inside = np.maximum(np.abs(x), np.abs(y)) <= 0.8
    elif scene.shape == "triangle":  # apex up; y grows downwards
        inside = (y <= 0.75) & (np.abs(x) <= (y + 1.0) / 1.75)
    elif scene.shape == "cross":
        inside = ((np.abs(x) <= 0.3) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1.0))
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(SIZE, _SUPER, SIZE, _SUPER).mean(axis=(1, 3))


def render(scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    """Images in [-1, 1], (N, 3, 32, 32) float32, with slight colour jitter."""
    out = np.empty((len(scenes), 3, SIZE, SIZE), dtype=np.float32)
    for i, s in enumerate(scenes):
        fg = np.clip(np.array(COLOURS[s.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
        bg = np.clip(np.array(BACKGROUNDS[s.background]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
        a = coverage(s)[None]
        out[i] = (a * fg[:, None, None] + (1 - a) * bg[:, None, None]) * 2.0 - 1.0
    return out


def caption(scene: Scene, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """A caption for `scene` from `templates`, with a random synonym per word."""
    t = templates[rng.integers(len(templates))]
    c_words, s_words = TRAIN_COLOUR_WORDS[scene.colour], TRAIN_SHAPE_WORDS[scene.shape]
    return t.format(
        c=c_words[rng.integers(len(c_words))],
        s=s_words[rng.integers(len(s_words))],
        bg=scene.background,
        size=scene.size_word,
        pos=scene.position_word,
    )


def all_train_captions() -> list[str]:
    """Every caption training can produce, for encoding once up front."""
    caps: set[str] = set()
    for colour in COLOUR_NAMES:
        for shape in SHAPES:
            for c in TRAIN_COLOUR_WORDS[colour]:
                for s in TRAIN_SHAPE_WORDS[shape]:
                    for t in TRAIN_TEMPLATES:
                        for bg in BACKGROUND_NAMES:
                            for size in ("small", "large"):
                                for v in ("top", "bottom", ""):
                                    for h in ("left", "right", ""):
                                        pos = f"{v} {h}".strip() or "center"
                                        caps.add(t.format(c=c, s=s, bg=bg, size=size, pos=pos))
    return sorted(caps)


def batch(seed: int, index: int, n: int) -> tuple[np.ndarray, list[Scene], list[str]]:
    """Batch `index` of the stream seeded by `seed`: images, scenes and captions."""
    rng = np.random.default_rng([seed, index])
    scenes = sample_scenes(rng, n)
    return render(scenes, rng), scenes, [caption(s, rng) for s in scenes]


def labels(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Shape and colour class indices."""
    return (
        np.array([SHAPES.index(s.shape) for s in scenes]),
        np.array([COLOUR_NAMES.index(s.colour) for s in scenes]),
    )


def eval_prompts() -> list[tuple[str, str, str]]:
    """Held-out prompts: every (colour, shape) in every held-out template, base words only."""
    return [(t.format(c=c, s=s), c, s) for t in HELDOUT_TEMPLATES for c in COLOUR_NAMES for s in SHAPES]
