"""The shipped judge can fail: it scores every negative control low, and each graded corruption falls with
strength, from high at its mildest level to low at its strongest."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from fewstep.evaluation import controls, modes
from fewstep.evaluation.classifier import load_classifier

pytestmark = pytest.mark.slow  # renders and judges ~3600 images (~9 s): the fast layer stays under 2 min

TOLERANCE = 0.05
"""How much a corruption's joint accuracy may rise from one strength to the next: sampling noise at `N` images."""
N = 150


@pytest.fixture(scope="module")
def rows(checkpoints: Path) -> list[controls.ControlRow]:
    return controls.control_rows(load_classifier(checkpoints / "shapes-classifier"), seed=1, n=N)


def test_real_images_are_judged_right(rows: list[controls.ControlRow]) -> None:
    assert rows[0].name == "real images" and rows[0].joint_accuracy >= controls.HIGH


@pytest.mark.parametrize("name", list(controls.CONTROLS))
def test_every_control_scores_low(rows: list[controls.ControlRow], name: str) -> None:
    (row,) = [r for r in rows if r.name == name]
    assert row.strength is None
    assert row.joint_accuracy <= controls.LOW and row.joint_probability <= controls.LOW, row


@pytest.mark.parametrize("name", list(controls.CORRUPTIONS))
def test_each_corruption_falls_from_high_to_low(rows: list[controls.ControlRow], name: str) -> None:
    graded = [r for r in rows if r.name == name]
    assert [r.strength for r in graded] == list(controls.CORRUPTIONS[name][1])
    acc = [r.joint_accuracy for r in graded]
    prob = [r.joint_probability for r in graded]
    assert acc[0] >= controls.HIGH, acc
    assert acc[-1] <= controls.LOW and prob[-1] <= controls.LOW, acc
    assert all(b <= a + TOLERANCE for a, b in pairwise(acc)), acc
    assert all(b <= a + TOLERANCE for a, b in pairwise(prob)), prob


def test_corruptions_at_strength_zero_leave_images_alone() -> None:
    real = controls.real_set(seed=2, n=8)
    for name, (corrupt, _) in controls.CORRUPTIONS.items():
        assert np.allclose(corrupt(real, 0.0), real.images, atol=1e-6), name


def test_wrong_colour_and_shape_redraw_the_same_scene_on_the_same_background() -> None:
    real = controls.real_set(seed=2, n=40)
    background = modes.background_index(modes.to_unit(real.images))
    for make in (controls.wrong_colour, controls.wrong_shape):
        assert (modes.background_index(modes.to_unit(make(real))) == background).all()
    diff = np.abs(controls.wrong_colour(real) - real.images).max(axis=1)
    assert diff[real.coverage == 0].max() <= 0.161  # only the ±0.04 jitter is drawn anew: ±0.08 on [-1, 1]
    assert (diff[real.coverage == 1] > 0.3).all()
    assert (controls.blank(real) == real.images[:, :, :1, :1]).all()  # one flat colour: the image's background


def test_markdown_has_a_line_per_row(rows: list[controls.ControlRow]) -> None:
    table = controls.controls_markdown(rows).splitlines()
    assert len(table) == len(rows) + 2
    assert table[2].startswith("| real images | — | ")
