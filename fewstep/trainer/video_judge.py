"""Training the video judge: the attribute classifier trained on single frames of procedural clips.

The network is the image judge's (`evaluation.classifier.AttributeClassifier`, size-agnostic by its
max pooling), trained on frames at the video size, at random points of their motion, with the same
noise and blur augmentation. How streams are judged with it is `evaluation.motion`, whose motion rule
`motion_confusion` checks on real clips.
"""

from __future__ import annotations

import numpy as np

from fewstep.evaluation import clips, motion, shapes
from fewstep.evaluation.classifier import AttributeClassifier
from fewstep.trainer.classifier import train_classifier


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


def real_streams(seed: int, n: int, frames: int, size: int) -> tuple[np.ndarray, list[clips.Clip]]:
    """`n` real clips of `frames` frames: the ceiling every generated stream is judged against."""
    rng = np.random.default_rng([seed, 104729])
    targets = clips.sample_clips(rng, n)
    return np.stack([clips.render(c, frames, rng, size) for c in targets]), targets


def motion_confusion(seed: int, n: int, frames: int, size: int) -> dict[str, dict[str, float]]:
    """The motion rule on `n` real clips (`real_streams`), per true speed: right at the true speed, and
    wrong at the other speed or in the wrong direction (`motion.judge_confusion`). Pixels only: it needs
    no trained judge."""
    return motion.judge_confusion(*real_streams(seed, n, frames, size))
