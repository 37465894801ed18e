"""The motion judge: real clips pass through their bounces; frozen, sideways and noisy streams fail."""

from __future__ import annotations

import numpy as np

from fewstep.evaluation import clips, motion, shapes
from fewstep.trainer.video_judge import real_streams


def _scores(videos: np.ndarray, targets: list[clips.Clip]) -> np.ndarray:
    return np.stack(
        [
            motion.motion_correct(motion.centroids(v), motion.wall_gaps(v), c.direction, c.speed, 16)
            for v, c in zip(videos, targets, strict=True)
        ]
    )


def test_real_streams_pass_through_many_bounces() -> None:
    videos, targets = real_streams(3, 24, 128, 16)
    bounces = sum(len(set(c.motion(128))) > 1 for c in targets)
    assert bounces >= 20  # most of these streams bounce, some many times
    assert _scores(videos, targets).mean() >= 0.97


def test_frozen_sideways_and_noise_streams_fail() -> None:
    videos, targets = real_streams(4, 16, 64, 16)
    frozen = np.repeat(videos[:, :1], 64, axis=1)
    assert _scores(frozen, targets)[:, 1:].mean() <= 0.05
    turned = [
        clips.Clip(c.scene, {"left": "up", "right": "down", "up": "left", "down": "right"}[c.direction], c.speed)
        for c in targets
    ]
    assert _scores(videos, turned)[:, 1:].mean() <= 0.1  # the prompt said the other axis
    noise = np.random.default_rng(0).uniform(-1, 1, videos.shape).astype(np.float32)
    assert _scores(noise, targets)[:, 1:].mean() <= 0.1


def test_a_reversal_in_mid_field_is_wrong() -> None:
    videos, targets = real_streams(5, 256, 10, 16)
    # A stream that has not bounced by frame 9 and is well clear of the walls at frame 5: play it backwards.
    for v, c in zip(videos, targets, strict=True):
        axis = 0 if clips.DIRECTIONS[c.direction][0] else 1
        clear = motion.SPAN * clips.SPEEDS[c.speed] * 16 / shapes.SIZE + 1.5  # past the judge's wall zone
        if len(set(c.motion(10))) == 1 and motion.wall_gaps(v[5:6])[0, axis] > clear:
            swapped = np.concatenate([v[:6], v[4::-1]])
            ok = motion.motion_correct(motion.centroids(swapped), motion.wall_gaps(swapped), c.direction, c.speed, 16)
            assert ok[1:6].all() and not ok[6:8].all()
            return
    raise AssertionError("no stream without a bounce in the sample")
