"""The sampling loops shared by the trainer's evaluation and the engines.

Both run exactly this code, so a number in the model card is a number the server delivers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.models.schedules import FewStepSchedule, TeacherSampler, item_noise
from fewstep.models.unet import Denoiser

IMAGE_SHAPE = (3, 32, 32)


def to_pixels(x0: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounding half up."""
    return ((x0.clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """Step-0 latents, one per seed."""
    return torch.stack([item_noise(s, 0, shape) for s in seeds])


@dataclass(frozen=True)
class HybridTeacher:
    """The base model that takes the first step of hybrid items, with its own classic CFG."""

    net: Denoiser
    guidance: float
    null_states: torch.Tensor
    null_mask: torch.Tensor

    NFE_PER_STEP = 2  # classic CFG: a conditional and an unconditional evaluation


@dataclass(eq=False)
class Trajectory:
    """One item's walk down its own timestep list. `advance` moves it one step; `x0` is set at the end."""

    seed: int
    timesteps: list[float]
    states: torch.Tensor
    mask: torch.Tensor
    x: torch.Tensor
    hybrid: bool = False
    k: int = 0
    x0: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.k >= len(self.timesteps)


def start_trajectory(
    schedule: FewStepSchedule,
    steps: int,
    seed: int,
    states: torch.Tensor,
    mask: torch.Tensor,
    shape: tuple[int, ...] = IMAGE_SHAPE,
    hybrid: bool = False,
) -> Trajectory:
    """A trajectory at step 0: the `steps`-step timestep list and the seed's step-0 noise."""
    timesteps = schedule.timesteps_for(steps)
    if hybrid and len(timesteps) < 2:
        raise ValueError("hybrid items need at least 2 steps")
    return Trajectory(seed, timesteps, states, mask, item_noise(seed, 0, shape), hybrid)


@torch.inference_mode()
def advance(
    net: Denoiser, schedule: FewStepSchedule, trajs: Sequence[Trajectory], teacher: HybridTeacher | None = None
) -> None:
    """One network evaluation for every trajectory, each at its own step of its own list.

    This is the unit of step-level batching: trajectories may be at different steps (and
    timesteps) in the same batch. The next state of each is computed from its own prediction
    and its own (seed, step) noise, so it does not depend on its neighbours. Hybrid
    trajectories (diversity distillation) take their first step with `teacher` (classic CFG).
    """
    x = torch.stack([t.x for t in trajs])
    tt = torch.tensor([t.timesteps[t.k] for t in trajs])
    states = torch.stack([t.states for t in trajs])
    mask = torch.stack([t.mask for t in trajs])
    by_teacher = [j for j, t in enumerate(trajs) if t.k == 0 and t.hybrid]
    if by_teacher and teacher is None:
        raise ValueError("hybrid items need a teacher")
    if not by_teacher:
        v = net(x, tt, states, mask)  # the common case: no gather/scatter
    elif len(by_teacher) == len(trajs):
        assert teacher is not None
        v = cfg_flow(teacher.net, x, tt, states, mask, teacher.null_states, teacher.null_mask, teacher.guidance)
    else:
        assert teacher is not None
        taken = set(by_teacher)
        by_student = [j for j in range(len(trajs)) if j not in taken]
        v = torch.empty_like(x)
        v[by_student] = net(x[by_student], tt[by_student], states[by_student], mask[by_student])
        v[by_teacher] = cfg_flow(
            teacher.net,
            x[by_teacher],
            tt[by_teacher],
            states[by_teacher],
            mask[by_teacher],
            teacher.null_states,
            teacher.null_mask,
            teacher.guidance,
        )
    x0 = schedule.to_x0(v, x, tt)
    for j, t in enumerate(trajs):
        if t.k + 1 == len(t.timesteps):
            t.x0 = x0[j]
        else:
            fresh = item_noise(t.seed, t.k + 1, t.x.shape)
            t.x = schedule.next_state(
                x0[j : j + 1],
                v[j : j + 1],
                x[j : j + 1],
                tt[j : j + 1],
                torch.tensor([t.timesteps[t.k + 1]]),
                fresh[None],
            )[0]
        t.k += 1


def student_sample_mixed(
    net: Denoiser,
    schedule: FewStepSchedule,
    steps: Sequence[int],
    states: torch.Tensor,
    mask: torch.Tensor,
    seeds: Sequence[int],
    shape: tuple[int, ...] = IMAGE_SHAPE,
    on_step: Callable[[int, list[int]], None] | None = None,
    hybrid: Sequence[bool] | None = None,
    teacher: HybridTeacher | None = None,
) -> torch.Tensor:
    """x0 for each item after its own number of steps, all starting together in one batch.

    Item i walks the `steps[i]`-step timestep list of the schedule; an item that has finished
    leaves the batch, so a batch of 1- and 4-step items costs 1 + 3 × (4-step share)
    evaluations. `on_step(k, active)` runs before step k with the indices still active.
    Hybrid items need `teacher` and at least 2 steps (see `advance`).
    """
    flags = list(hybrid) if hybrid is not None else [False] * len(steps)
    if any(flags) and teacher is None:
        raise ValueError("hybrid items need a teacher")
    trajs = [
        start_trajectory(schedule, n, seed, states[i], mask[i], shape, h)
        for i, (n, seed, h) in enumerate(zip(steps, seeds, flags, strict=True))
    ]
    k = 0
    while active := [i for i, t in enumerate(trajs) if not t.done]:
        if on_step is not None:
            on_step(k, active)
        advance(net, schedule, [trajs[i] for i in active], teacher)
        k += 1
    return torch.stack([t.x0 for t in trajs if t.x0 is not None])


@torch.inference_mode()
def cfg_flow(
    net: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    null_states: torch.Tensor,
    null_mask: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Classic classifier-free guidance: one batched call over (cond, uncond), 2 NFE per item."""
    n = x.shape[0]
    both = net(
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([states, null_states.expand(n, -1, -1)]),
        torch.cat([mask, null_mask.expand(n, -1)]),
    )
    v_c, v_u = both[:n], both[n:]
    return v_u + guidance * (v_c - v_u)


@torch.inference_mode()
def teacher_sample(
    net: Denoiser,
    sampler: TeacherSampler,
    states: torch.Tensor,
    mask: torch.Tensor,
    null_states: torch.Tensor,
    null_mask: torch.Tensor,
    x: torch.Tensor,
    record: Sequence[float] = (),
) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """Euler on the flow ODE from t=1 (`x` is the noise) to 0, with CFG.

    Returns the final sample and the states at the requested `record` times (which must lie
    on the sampler's grid).
    """
    grid = sampler.grid()
    keys = {round(t * sampler.steps): t for t in record}
    recorded: dict[float, torch.Tensor] = {}
    n = x.shape[0]
    for i in range(sampler.steps):
        if i in keys:
            recorded[keys[i]] = x.clone()
        t, t_next = grid[i], grid[i + 1]
        v = cfg_flow(net, x, torch.full((n,), t), states, mask, null_states, null_mask, sampler.guidance)
        x = x + (t_next - t) * v
    return x, recorded
