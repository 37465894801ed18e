"""The sampling loops shared by the trainer's evaluation, the exporters' parity checks and the engines.

All of them run exactly this code (and `FewStepSchedule.step`, the one update rule), so a number in
the model card is a number the server delivers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.errors import CheckpointError
from fewstep.models.schedules import FewStepSchedule, TeacherSampler, item_noise, kept_steps
from fewstep.models.unet import Denoiser
from fewstep.models.video_cache import KVCache, TextKV, VideoConfig, VideoNet

IMAGE_SHAPE = (3, 32, 32)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] (clamped) → uint8 0–255, rounding half up; any shape."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().to(torch.uint8)


def to_pixels(x0: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → (B, H, W, C) uint8 pictures."""
    return to_uint8(x0).permute(0, 2, 3, 1).numpy()


def from_pixels(pixels: np.ndarray) -> torch.Tensor:
    """(…, H, W, C) uint8 pictures → (…, C, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float() / 127.5 - 1.0


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """Step-0 latents, one per seed."""
    return torch.stack([item_noise(s, 0, shape) for s in seeds])


HANDOFFS = ("renoise", "trajectory")


@dataclass(frozen=True)
class Handoff:
    """How a hybrid item passes from the teacher to the student: a property of the model pair, read from the
    student's manifest (`"hybrid": {"handoff": ..., "teacher_steps": ...}`).

    * `renoise` (the diversity-distillation paper's recipe): the teacher takes one step at the student's first
      timestep, t = 1, and the schedule's re-noise moves its x0 prediction to the student's next timestep
      with fresh noise. Right for a teacher whose noise schedule never reaches zero SNR (SD, SDXL): its x_T
      still carries the seed, so its first x0 estimate differs from seed to seed.
    * `trajectory`: the teacher integrates its own probability-flow ODE (Euler, its classic CFG) from t = 1
      to the student's next timestep in `teacher_steps` steps, and the student continues from that state.
      For a zero-terminal-SNR teacher (flow matching, the shipped pair): its x0 estimate at t = 1 is the
      prompt's mean image, so a re-noise would throw the seed away; the ODE keeps it. The steps are
      `t_i = 1 - (1 - t_end) (i / teacher_steps) ** spacing`: with `spacing` > 1 they crowd near t = 1,
      where the teacher decides what the seed leaves open (background, layout); coarse equal steps there
      pull every seed towards the mean image (docs/decisions/hybrid-handoff.md).
    """

    kind: str = "renoise"
    teacher_steps: int = 1
    spacing: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in HANDOFFS:
            raise ValueError(f"hybrid hand-off must be one of {HANDOFFS}. Given: {self.kind!r}")
        if self.kind == "renoise" and self.teacher_steps != 1:
            raise ValueError(f"the renoise hand-off takes one teacher step. Given: {self.teacher_steps}")
        if not 1 <= self.teacher_steps <= 16:
            raise ValueError(f"hybrid teacher_steps must be between 1 and 16. Given: {self.teacher_steps}")
        if not 0.25 <= self.spacing <= 8.0:
            raise ValueError(f"hybrid spacing must be between 0.25 and 8. Given: {self.spacing}")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Handoff:
        """The student manifest's hand-off (`renoise` when it names none); CheckpointError when it is invalid."""
        pair = manifest.get("hybrid") or {}
        try:
            return cls(
                str(pair.get("handoff", "renoise")),
                int(pair.get("teacher_steps", 1)),
                float(pair.get("spacing", 1.0)),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{manifest.get('name')}: invalid `hybrid` section: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "renoise":
            return {"handoff": self.kind}
        return {"handoff": self.kind, "teacher_steps": self.teacher_steps, "spacing": self.spacing}

    def timesteps(self, student: list[float]) -> list[float]:
        """A hybrid item's whole timestep list for the student's `student` list (≥ 2 entries): the teacher's
        first `teacher_steps` entries, then the student's from its second on."""
        if self.kind == "renoise":
            return list(student)
        top, end = student[0], student[1]
        m = self.teacher_steps
        return [top - (top - end) * (i / m) ** self.spacing for i in range(m)] + student[1:]


@dataclass(frozen=True)
class HybridTeacher:
    """The base model that takes the first interval of hybrid items, with its own classic CFG, and the pair's
    hand-off."""

    net: Denoiser
    guidance: float
    null_states: torch.Tensor
    null_mask: torch.Tensor
    handoff: Handoff = Handoff()

    NFE_PER_STEP = 2  # classic CFG: a conditional and an unconditional evaluation

    @property
    def nfe(self) -> int:
        """Network evaluations the teacher spends on one hybrid item."""
        return self.NFE_PER_STEP * self.handoff.teacher_steps


@dataclass(eq=False)
class Trajectory:
    """One image's walk down its own timestep list. `advance` moves it one step; `x0` is set at the end."""

    seed: int
    timesteps: list[float]
    states: torch.Tensor
    mask: torch.Tensor
    x: torch.Tensor
    hybrid: bool = False
    k: int = 0
    x0: torch.Tensor | None = None
    teacher_steps: int = 0
    """Leading entries of `timesteps` the teacher takes (0 unless hybrid)."""
    teacher_ode: bool = False
    """Whether the teacher's steps follow its ODE (the `trajectory` hand-off) rather than the schedule's update."""
    estimate: torch.Tensor | None = None
    """The x0 estimate of the last step taken (what a partial image shows)."""

    @property
    def by_teacher(self) -> bool:
        return self.k < self.teacher_steps

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
    handoff: Handoff | None = None,
) -> Trajectory:
    """A trajectory at step 0: the `steps`-step timestep list (a hybrid's begins with its teacher's, as
    `handoff` says) and the seed's step-0 noise."""
    timesteps = schedule.timesteps_for(steps)
    if not hybrid:
        return Trajectory(seed, timesteps, states, mask, item_noise(seed, 0, shape))
    if len(timesteps) < 2:
        raise ValueError("hybrid items need at least 2 steps")
    h = handoff or Handoff()
    return Trajectory(
        seed,
        h.timesteps(timesteps),
        states,
        mask,
        item_noise(seed, 0, shape),
        hybrid=True,
        teacher_steps=h.teacher_steps,
        teacher_ode=h.kind == "trajectory",
    )


def start_edit(
    schedule: FewStepSchedule,
    steps: int,
    strength: float,
    seed: int,
    states: torch.Tensor,
    mask: torch.Tensor,
    image: torch.Tensor,
) -> Trajectory:
    """An edit's trajectory (img2img): the last `kept_steps(steps, strength)` timesteps of the `steps`-step list,
    from `image` (C, H, W) in [-1, 1] noised to the first of them with the seed's step-0 noise, as the flow's
    forward process does (x_t = (1 − t) x0 + t ε). At strength 1 it is the text-to-image trajectory."""
    timesteps = schedule.timesteps_for(steps)
    kept = timesteps[steps - kept_steps(steps, strength) :]
    if not kept:
        raise ValueError(f"strength {strength} keeps no step of {steps}")
    t0 = kept[0]
    x = (1.0 - t0) * image + t0 * item_noise(seed, 0, tuple(image.shape))
    return Trajectory(seed, kept, states, mask, x)


@torch.inference_mode()
def advance(
    net: Denoiser, schedule: FewStepSchedule, trajs: Sequence[Trajectory], teacher: HybridTeacher | None = None
) -> None:
    """One network evaluation for every trajectory, each at its own step of its own list.

    This is the unit of step-level batching: trajectories may be at different steps (and
    timesteps) in the same batch. The next state of each is computed from its own prediction
    and its own (seed, step) noise, so it does not depend on its neighbours. Hybrid
    trajectories (diversity distillation) take their first `teacher_steps` with `teacher` (classic CFG),
    along the teacher's ODE for the `trajectory` hand-off.
    """
    x = torch.stack([t.x for t in trajs])
    tt = torch.tensor([t.timesteps[t.k] for t in trajs])
    states = torch.stack([t.states for t in trajs])
    mask = torch.stack([t.mask for t in trajs])
    by_teacher = [j for j, t in enumerate(trajs) if t.by_teacher]
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
    t_next = [t.timesteps[t.k + 1] if t.k + 1 < len(t.timesteps) else None for t in trajs]
    x0, nxt = schedule.step(x, tt, v, t_next, lambda j: item_noise(trajs[j].seed, trajs[j].k + 1, trajs[j].x.shape))
    for j in by_teacher:
        tn = t_next[j]
        if trajs[j].teacher_ode and tn is not None:  # the teacher's own Euler step: the seed's noise is kept
            nxt[j] = x[j] + (tn - tt[j]) * v[j]
    for j, t in enumerate(trajs):
        state = nxt[j]
        t.estimate = x0[j]
        if state is None:
            t.x0 = x0[j]
        else:
            t.x = state
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
    handoff = teacher.handoff if teacher is not None else None
    trajs = [
        start_trajectory(schedule, n, seed, states[i], mask[i], shape, h, handoff)
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


# -- video ------------------------------------------------------------------------------------------
NOISE_STRIDE = 16
"""Noise indices per frame: frame f, step k draws `item_noise(seed, f * NOISE_STRIDE + k)`."""

Noise = Callable[[int, int], torch.Tensor]
"""(frame index, step index) → the (B, C, H, W) noise a stream batch draws there."""


def frame_noise(seeds: Sequence[int], frame: int, step: int, cfg: VideoConfig) -> torch.Tensor:
    """(B, C, H, W) noise for step `step` of frame `frame`: a function of (seed, frame, step) only, so a
    stream is the same whether it runs alone or batched with others, and on any backend."""
    shape = (cfg.channels, cfg.size, cfg.size)
    return torch.stack([item_noise(s, frame * NOISE_STRIDE + step, shape) for s in seeds])


@torch.inference_mode()
def student_stream(
    net: VideoNet,
    text: TextKV,
    schedule: FewStepSchedule,
    steps: int,
    frames: int,
    noise: Noise,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, frames, C, H, W) in [-1, 1]: each frame in `steps` student steps (CFG is baked into a
    student), then written to the cache. The served engine batches the same update rule across
    sessions at step boundaries; this is the one-batch reference the trainer rolls out and judges.
    With `first`, frame 0 is given and the stream continues it."""
    b = text.mask.shape[0]
    cache = KVCache.empty(net.cfg, b)
    ts = schedule.timesteps_for(steps)
    out = []
    if first is not None:  # a given first frame (B, C, H, W): the stream continues it
        cache.store(*net.keys_values(first, text, cache), first, sink=net.cfg.sink, window=net.cfg.window)
        out.append(first)
    for f in range(len(out), frames):
        x = noise(f, 0)
        x0 = x
        for k, t in enumerate(ts):
            tt = torch.full((b,), t)
            v = net.denoise(x, tt, text, cache)
            t_next = ts[k + 1] if k + 1 < len(ts) else None
            fresh = noise(f, k + 1) if t_next is not None else x
            x0, nxt = schedule.step(x, tt, v, [t_next] * b, fresh.__getitem__)
            if t_next is not None:
                x = torch.stack([n for n in nxt if n is not None])
        frame = x0.clamp(-1, 1)
        cache.store(*net.keys_values(frame, text, cache), frame, sink=net.cfg.sink, window=net.cfg.window)
        out.append(frame)
    return torch.stack(out, dim=1)


def frame_from_image(pixels: np.ndarray, size: int) -> torch.Tensor:
    """An image model's (H, W, 3) uint8 picture as a video frame (3, size, size) in [-1, 1]: each block of
    the picture averaged, as the video data set makes its frames (image to video: frame 0)."""
    x = from_pixels(pixels)
    factor = x.shape[-1] // size
    if factor * size != x.shape[-1]:
        raise CheckpointError(f"the first-frame model's {x.shape[-1]}-pixel images do not reduce to {size}")
    return F.avg_pool2d(x[None], factor)[0] if factor > 1 else x
