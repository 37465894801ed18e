"""Procedural clips: deterministic, always inside the frame, moving the way their captions say."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.evaluation import clips, shapes


def _centroid(frame: np.ndarray, background: np.ndarray) -> tuple[float, float]:
    """Centre of the pixels that differ from the background colour."""
    mass = np.abs(frame - background[:, None, None]).sum(0)
    ys, xs = np.mgrid[0 : frame.shape[1], 0 : frame.shape[2]]
    return float((xs * mass).sum() / mass.sum()) + 0.5, float((ys * mass).sum() / mass.sum()) + 0.5


def test_batches_are_deterministic_by_seed_and_index() -> None:
    a, ca, capa = clips.batch(0, 3, 4, frames=6)
    b, cb, capb = clips.batch(0, 3, 4, frames=6)
    c, _, _ = clips.batch(0, 4, 4, frames=6)
    assert a.shape == (4, 6, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and ca == cb and capa == capb
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_captions_name_colour_shape_direction_and_speed() -> None:
    _, cl, caps = clips.batch(1, 0, 32, frames=1)
    for clip, cap in zip(cl, caps, strict=True):
        assert clip.direction in cap and clip.speed in cap
        assert any(w in cap for w in shapes.TRAIN_COLOUR_WORDS[clip.scene.colour])
        assert any(w in cap for w in shapes.TRAIN_SHAPE_WORDS[clip.scene.shape])


@pytest.mark.parametrize("direction", clips.DIRECTION_NAMES)
def test_the_shape_moves_as_captioned_then_bounces_and_never_leaves_the_frame(direction: str) -> None:
    rng = np.random.default_rng(5)
    scene = shapes.Scene("square", "red", "black", radius=5.0, cx=16.0, cy=16.0)
    clip = clips.Clip(scene, direction, "quickly")
    frames = 64
    video = clips.render(clip, frames, rng)
    bg = video[0, :, 0, 0]  # a corner pixel: the shape never reaches it at this size
    centres = np.array([_centroid(f, bg) for f in video])
    dx, dy = clips.DIRECTIONS[direction]
    step = centres[1] - centres[0]
    assert np.allclose(step, (dx * 3.0, dy * 3.0), atol=0.1)  # first frames: as captioned, at its speed
    # The whole shape stays visible: its pixel mass never drops (it would, cut off at an edge).
    mass = np.abs(video - bg[None, :, None, None]).sum(axis=(1, 2, 3))
    assert mass.min() > 0.97 * mass.max()
    motion = clip.motion(frames)
    assert motion[0] == direction and len(set(motion)) == 2  # it bounced: the opposite direction appears
    track = clip.track(frames)
    assert (track[:, :2] >= scene.radius).all() and (track[:, :2] <= shapes.SIZE - scene.radius).all()


def test_speed_and_size_options() -> None:
    scene = shapes.Scene("circle", "blue", "white", radius=5.0, cx=8.0, cy=16.0)
    slow = clips.Clip(scene, "right", "slowly").track(3)
    assert np.allclose(slow[:, 0], [8.0, 10.0, 12.0])
    small = clips.render(clips.Clip(scene, "right", "slowly"), 4, np.random.default_rng(0), size=16)
    assert small.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="size must divide 32"):
        clips.render(clips.Clip(scene, "right", "slowly"), 1, np.random.default_rng(0), size=12)
