"""The hybrid's hand-offs: the re-noised one forgets the seed's noise where the teacher's t = 1 estimate is the
same for every seed; the trajectory one follows the teacher's ODE and keeps it."""

from __future__ import annotations

import pytest
import torch

from fewstep.errors import CheckpointError
from fewstep.models.sampling import Handoff, HybridTeacher, advance, start_trajectory
from fewstep.models.schedules import default_student_schedule, item_noise

SHAPE = (3, 4, 4)
MEAN = torch.linspace(-0.5, 0.5, 48).reshape(SHAPE)


def mean_image_teacher(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A flow model whose every x0 estimate is one image, as a zero-terminal-SNR teacher's is at t = 1."""
    return (x - MEAN) / t.view(-1, 1, 1, 1)


def student(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return 0.5 * x


def teacher(handoff: Handoff) -> HybridTeacher:
    return HybridTeacher(mean_image_teacher, 1.0, torch.zeros(1, 2, 3), torch.ones(1, 2), handoff)


def hand_off_state(seed: int, handoff: Handoff, steps: int = 2) -> torch.Tensor:
    """The state a hybrid item reaches when the teacher has done its part."""
    schedule = default_student_schedule()
    traj = start_trajectory(schedule, steps, seed, torch.zeros(2, 3), torch.ones(2), SHAPE, True, handoff)
    while traj.by_teacher:
        advance(student, schedule, [traj], teacher(handoff))
    return traj.x


def test_the_trajectory_timesteps_put_the_teachers_steps_before_the_students_second() -> None:
    assert Handoff("trajectory", 4).timesteps([1.0, 0.5]) == [1.0, 0.875, 0.75, 0.625, 0.5]
    assert Handoff("trajectory", 2).timesteps([1.0, 0.75, 0.5, 0.25]) == [1.0, 0.875, 0.75, 0.5, 0.25]
    assert Handoff("trajectory", 2, spacing=3.0).timesteps([1.0, 0.5]) == [1.0, 0.9375, 0.5]
    assert Handoff().timesteps([1.0, 0.5]) == [1.0, 0.5]


def test_renoise_forgets_the_seeds_noise_and_trajectory_keeps_it() -> None:
    renoised = hand_off_state(3, Handoff())
    # x0 = MEAN for every seed, re-noised with the step-1 noise: nothing of the step-0 noise is left.
    assert torch.allclose(renoised, 0.5 * MEAN + 0.5 * item_noise(3, 1, SHAPE), atol=1e-6)
    kept = hand_off_state(3, Handoff("trajectory", 4))
    # The teacher's ODE from the seed's own noise: x_t = (1 - t) MEAN + t ε is exact for this teacher.
    assert torch.allclose(kept, 0.5 * MEAN + 0.5 * item_noise(3, 0, SHAPE), atol=1e-5)


def test_a_hybrid_item_costs_the_teachers_steps_and_the_students_rest() -> None:
    schedule = default_student_schedule()
    h = Handoff("trajectory", 3)
    traj = start_trajectory(schedule, 4, 1, torch.zeros(2, 3), torch.ones(2), SHAPE, True, h)
    calls = 0
    while not traj.done:
        calls += 1
        advance(student, schedule, [traj], teacher(h))
    assert calls == 3 + 3 and traj.x0 is not None and teacher(h).nfe == 6


@pytest.mark.parametrize(
    "section",
    [
        {"handoff": "sideways"},
        {"handoff": "renoise", "teacher_steps": 2},
        {"handoff": "trajectory", "teacher_steps": 0},
        {"handoff": "trajectory", "teacher_steps": 2, "spacing": "wide"},
        {"handoff": "trajectory", "teacher_steps": 2, "spacing": 100},
    ],
)
def test_an_invalid_hand_off_in_a_manifest_is_a_checkpoint_error(section: dict) -> None:
    with pytest.raises(CheckpointError, match="invalid `hybrid` section"):
        Handoff.from_manifest({"name": "m", "hybrid": section})
    assert Handoff.from_manifest({"name": "m"}) == Handoff()
