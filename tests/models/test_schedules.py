import pytest
import torch

from fewstep.errors import InvalidRequest
from fewstep.models.schedules import FewStepSchedule, TeacherSampler, default_student_schedule, item_noise


def test_default_schedule_serves_one_to_four_steps() -> None:
    s = default_student_schedule()
    assert s.steps == [1, 2, 3, 4]
    assert s.timesteps_for(1) == [1.0]
    assert s.timesteps_for(4) == [1.0, 0.75, 0.5, 0.25]


def test_round_trip_through_manifest_dict() -> None:
    s = default_student_schedule()
    assert FewStepSchedule.from_dict(s.to_dict()) == s


def test_untrained_step_count_is_an_invalid_request_naming_the_value() -> None:
    with pytest.raises(InvalidRequest, match=r"`steps` must be between 1 and 4\. Given: 5"):
        default_student_schedule().timesteps_for(5)


@pytest.mark.parametrize("bad", [{1: [0.5, 0.2]}, {2: [0.5, 0.9]}, {1: [1.5]}, {1: [0.0]}])
def test_malformed_timestep_lists_are_refused(bad: dict[int, list[float]]) -> None:
    with pytest.raises(ValueError):
        FewStepSchedule(timesteps=bad, default_steps=next(iter(bad)))


def test_item_noise_depends_only_on_seed_and_step() -> None:
    a = item_noise(7, 0, (3, 4, 4))
    assert torch.equal(a, item_noise(7, 0, (3, 4, 4)))
    assert not torch.equal(a, item_noise(7, 1, (3, 4, 4)))
    assert not torch.equal(a, item_noise(8, 0, (3, 4, 4)))


def test_renoise_and_ode_updates_differ_and_hit_their_targets() -> None:
    x0 = torch.zeros(1, 3, 2, 2)
    fresh = torch.ones(1, 3, 2, 2)
    v = torch.full((1, 3, 2, 2), 2.0)
    x = torch.full((1, 3, 2, 2), 0.5)
    t, tn = torch.tensor([1.0]), torch.tensor([0.5])
    renoised = default_student_schedule().next_state(x0, v, x, t, tn, fresh)
    assert torch.allclose(renoised, torch.full_like(x, 0.5))  # (1 - .5) * 0 + .5 * 1
    ode = FewStepSchedule(timesteps={1: [1.0]}, update="ode", default_steps=1).next_state(x0, v, x, t, tn, fresh)
    assert torch.allclose(ode, torch.full_like(x, -0.5))  # 0.5 + (0.5 - 1) * 2


def test_teacher_grid_runs_from_one_to_zero() -> None:
    grid = TeacherSampler(steps=4).grid()
    assert grid == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_a_schedule_longer_than_a_few_steps_is_refused() -> None:
    """A manifest's schedule is untrusted: 999 steps would make every item, warm-up and gate probe 250× slower."""
    long = [1.0 - i / 999 for i in range(999)]
    with pytest.raises(ValueError, match="step counts must be between 1 and 16"):
        FewStepSchedule(timesteps={999: long}, default_steps=999)
