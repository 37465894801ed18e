"""`retarget.follow`: the clip's shape redrawn one step on from where a rollout has it."""

from __future__ import annotations

import numpy as np

from fewstep.evaluation import clips
from fewstep.trainer import retarget

FRAMES = 40  # long enough for every clip to bounce off a wall (2–3 px per frame at 32×32)


def _clips() -> tuple[np.ndarray, list[clips.Clip]]:
    video, batch, _ = clips.batch(7, 123, 16, FRAMES, 16)
    return video, batch


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a - b) ** 2).mean(axis=(-3, -2, -1))


def test_a_real_clip_is_its_own_target_through_its_bounces() -> None:
    video, batch = _clips()
    assert any(len(set(c.motion(FRAMES))) > 1 for c in batch)  # the clips do bounce
    target, ok = retarget.follow(video, batch, video[:, 0])
    assert ok.all()
    assert _mse(target, video).max() < 2e-3  # off by a small fraction of a pixel at most
    np.testing.assert_array_equal(target[:, 0], video[:, 0])


def test_the_colours_fit_to_the_first_frame_are_the_clips() -> None:
    video, batch = _clips()
    for frame, clip in zip(video[:, 0], batch, strict=True):
        bg, span = retarget.fit_colours(clip.scene, frame)
        a = retarget.coverage(clip.scene, 16)
        np.testing.assert_allclose(bg[:, None, None] + span[:, None, None] * a[None], frame, atol=1e-4)


def test_a_stream_that_froze_is_pulled_on_at_the_captions_speed() -> None:
    video, batch = _clips()
    frozen = np.repeat(video[:, :1], 6, axis=1)  # the shape never moved
    target, _ = retarget.follow(frozen, batch, video[:, 0])
    # Clips whose shape starts more than a step from the walls (a still shape next to a wall reads as a
    # bounce, and its target moves away from that wall).
    mid = [i for i, c in enumerate(batch) if _clear_of_walls(c)]
    assert len(mid) >= 5
    for f in range(1, 6):  # every target is one step on from frame 0, where each frame has the shape
        assert _mse(target[mid, f], video[mid, 1]).max() < 2e-3
    assert _mse(target[mid, 1], video[mid, 0]).min() > 5e-3  # and that step is a real move


def _clear_of_walls(c: clips.Clip) -> bool:
    s = c.scene
    at = s.cx if clips.DIRECTIONS[c.direction][0] else s.cy
    lo, hi = s.radius + 0.5, 32 - s.radius - 0.5
    return min(at - lo, hi - at) > clips.SPEEDS[c.speed]


def test_a_worn_shape_gets_a_crisp_target_where_it_is() -> None:
    video, batch = _clips()
    worn = 0.5 * (video + np.roll(video, 1, axis=-2))  # blurred down one pixel: smeared, not moved much
    worn = 0.5 * (worn + np.roll(worn, -1, axis=-2))
    target, ok = retarget.follow(worn, batch, video[:, 0])
    assert ok.all()
    assert _mse(target[:, 1:], video[:, 1:]).mean() < 0.2 * _mse(worn[:, 1:], video[:, 1:]).mean()


def test_a_frame_without_a_shape_leaves_the_next_frame_out() -> None:
    video, batch = _clips()
    gone = video.copy()
    gone[:, 3] = gone[:, 3, :, :1, :1]  # the background colour everywhere (corners are background)
    _, ok = retarget.follow(gone, batch, video[:, 0])
    assert not ok[:, 4].any() and ok[:, 3].all() and ok[:, 5].all()
