"""The motion judge: real clips pass through their bounces at their own speed, and fail at the other
speed, along the other axis or starting the other way; frozen and noisy streams fail."""

from __future__ import annotations

import numpy as np
import pytest

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
        if len(set(c.motion(10))) == 1 and motion.wall_gaps(v[5:6])[0, axis].min() > clear:
            swapped = np.concatenate([v[:6], v[4::-1]])
            ok = motion.motion_correct(motion.centroids(swapped), motion.wall_gaps(swapped), c.direction, c.speed, 16)
            assert ok[1:6].all() and not ok[6:8].all()
            return
    raise AssertionError("no stream without a bounce in the sample")


def test_real_clips_pass_at_their_speed_and_fail_at_the_other() -> None:
    videos, targets = real_streams(6, 64, 48, 16)
    confusion = motion.judge_confusion(videos, targets)
    assert set(confusion) == set(clips.SPEEDS)
    for row in confusion.values():
        assert row["streams"] >= 20
        assert row["prompted"] >= 0.97 and row["streams_prompted"] == 1.0
        assert row["other_speed"] <= 0.05 and row["streams_other_speed"] == 0.0  # slow and quick told apart
        assert row["other_axis"] <= 0.05
        # After its first bounce a clip played the other way moves as a prompted one: only its start is wrong.
        assert row["reversed_frame_1"] <= 0.1


def test_the_speed_boundary_is_the_mean() -> None:
    mid = (clips.SPEEDS["slowly"] + clips.SPEEDS["quickly"]) / 2 / 2  # at 16×16
    assert motion.speed_band("slowly", 16) == pytest.approx((0.4, mid))
    assert motion.speed_band("quickly", 16) == pytest.approx((mid, 3.75))


def _straight(steps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A track moving right by `steps` along the middle row, far from every wall."""
    x = 2.0 + np.concatenate([[0.0], np.cumsum(steps)])
    return np.stack([x, np.full_like(x, 8.0)], axis=1), np.full((len(x), 2, 2), 6.0)


@pytest.mark.parametrize(
    ("steps", "speed"),
    [([1.24] * 8, "slowly"), ([1.26] * 8, "quickly"), ([1.0, 2.0] * 4, "quickly"), ([0.9, 1.1] * 4, "slowly")],
)
def test_a_frame_is_judged_at_the_speed_it_is_nearer(steps: list[float], speed: str) -> None:
    track, gaps = _straight(steps)
    other = next(s for s in clips.SPEEDS if s != speed)
    assert motion.motion_correct(track, gaps, "right", speed, 16)[2:].all()  # uneven steps: a SPAN-step mean
    assert not motion.motion_correct(track, gaps, "right", other, 16)[2:].any()


def _gaps(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Wall gaps of a shape centred at `x` (moving along x, mid-height) whose centre stays within [lo, hi]."""
    gaps = np.full((len(x), 2, 2), 6.0)
    gaps[:, 0, 0], gaps[:, 0, 1] = x - lo, hi - x
    return gaps


def test_a_shape_in_a_room_two_steps_wide_is_judged_by_its_full_steps() -> None:
    x = np.array([5.0, 6.5, 8.0, 6.5, 5.0, 6.5, 8.0, 6.5, 5.0, 6.5, 8.0, 6.5])  # a turn at every other frame
    track = np.stack([x, np.full_like(x, 8.0)], axis=1)
    assert motion.motion_correct(track, _gaps(x, 5.0, 8.0), "right", "quickly", 16).all()
    assert not motion.motion_correct(track, _gaps(x, 5.0, 8.0), "right", "slowly", 16)[1:].any()


def test_a_shape_jittering_next_to_one_wall_fails() -> None:
    x = 12.0 + 0.6 * (np.arange(16) % 2)  # back and forth by 0.6 px by the right wall, never reaching the left
    track = np.stack([x, np.full_like(x, 8.0)], axis=1)
    assert motion.motion_correct(track, _gaps(x, 3.0, 12.6), "right", "slowly", 16)[1:].mean() <= 0.2
