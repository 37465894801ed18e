"""The sampling loops shared by the trainer's evaluation and the engines.

Both run exactly this code, so a number in the model card is a number the server delivers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.models.schedules import FewStepSchedule, TeacherSampler, item_noise
from fewstep.models.unet import Denoiser

IMAGE_SHAPE = (3, 32, 32)
StopCheck = Callable[[int, list[int]], Collection[int]]
"""`stop(k, active)` → the active item indices to drop before step k."""


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


@torch.inference_mode()
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
    stop: StopCheck | None = None,
) -> torch.Tensor:
    """x0 for each item after its own number of steps, in one shared batch.

    Item i walks the `steps[i]`-step timestep list of the schedule; an item that has finished
    leaves the batch, so a batch of 1- and 4-step items costs 1 + 3 × (4-step share)
    evaluations. Noise depends only on (seed, step), so an item's result does not depend on
    its neighbours. `on_step(k, active)` runs before step k with the indices still active.

    Hybrid items (diversity distillation) take their first step with `teacher` (classic
    CFG) instead of the student, at the same timestep; the schedule's update rule then moves
    them to the next timestep and the student finishes, so they need at least 2 steps.

    `stop(k, active)`, when given, runs at every step boundary before step k and returns the
    items to drop (cancelled work): they leave the batch at once and their output stays zero.
    """
    lists = [schedule.timesteps_for(n) for n in steps]
    hybrid = list(hybrid) if hybrid is not None else [False] * len(steps)
    if any(hybrid) and teacher is None:
        raise ValueError("hybrid items need a teacher")
    if any(h and len(ts) < 2 for h, ts in zip(hybrid, lists, strict=True)):
        raise ValueError("hybrid items need at least 2 steps")
    x = initial_noise(seeds, shape)
    out = torch.zeros_like(x)
    stopped: set[int] = set()
    for k in range(max(len(ts) for ts in lists)):
        active = [i for i, ts in enumerate(lists) if k < len(ts) and i not in stopped]
        if stop is not None and active:
            stopped |= set(stop(k, active)) & set(active)
            active = [i for i in active if i not in stopped]
        if not active:
            break
        if on_step is not None:
            on_step(k, active)
        xa = x[active]
        tt = torch.tensor([lists[i][k] for i in active])
        v = torch.empty_like(xa)
        by_teacher = [j for j, i in enumerate(active) if k == 0 and hybrid[i]]
        by_student = [j for j in range(len(active)) if j not in set(by_teacher)]
        if by_student:
            rows = [active[j] for j in by_student]
            v[by_student] = net(xa[by_student], tt[by_student], states[rows], mask[rows])
        if by_teacher:
            assert teacher is not None
            rows = [active[j] for j in by_teacher]
            v[by_teacher] = cfg_flow(
                teacher.net,
                xa[by_teacher],
                tt[by_teacher],
                states[rows],
                mask[rows],
                teacher.null_states,
                teacher.null_mask,
                teacher.guidance,
            )
        x0 = schedule.to_x0(v, xa, tt)
        for j, i in enumerate(active):
            if k + 1 == len(lists[i]):
                out[i] = x0[j]
            else:
                fresh = item_noise(seeds[i], k + 1, shape)
                x[i] = schedule.next_state(
                    x0[j : j + 1],
                    v[j : j + 1],
                    xa[j : j + 1],
                    tt[j : j + 1],
                    torch.tensor([lists[i][k + 1]]),
                    fresh[None],
                )[0]
    return out


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
