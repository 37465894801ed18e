"""The few-step causal video students: teacher forcing, self-forcing, and long rollouts.

All three learn the 1–4 step schedules by x0 regression at the schedules' timesteps
(`one_step_share` of frames at t = 1, from pure noise), frames 1 on (frame 0 is given):

* *teacher forcing* (a new network): every frame sees the real (noise-augmented) earlier frames;
* *self-forcing* (from the teacher-forcing student): each training step first rolls the student out on
  its own outputs through its cache, from the clip's real first frame, and every frame then sees those
  generated frames, regressed onto the real clip;
* *long rollouts* (from the self-forcing student): rollouts growing from `long_frames_from` to
  `long_frames_to` frames, each frame regressed onto the clip's shape redrawn one step on from where
  the rollout's previous frame has it (`retarget.follow`), not onto the real clip, which long rollouts
  leave. What was measured for each: docs/decisions/video-quality.md.
"""

from __future__ import annotations

import copy

import torch

from fewstep.evaluation import clips
from fewstep.models.sampling import student_stream
from fewstep.models.schedules import default_student_schedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser
from fewstep.trainer import retarget
from fewstep.trainer.progress import Progress
from fewstep.trainer.stages import VideoRecipe
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.video_teacher import corrupt, optimise


def _student_times(b: int, nf: int, share: float, g: torch.Generator) -> torch.Tensor:
    """Per-frame times: a `share` of the frames at t = 1 (the 1-step map), the rest at the lower
    timesteps of the 2–4 step schedules, which is where the re-noising sampler puts them."""
    lower = torch.tensor(sorted({t for ts in default_student_schedule().timesteps.values() for t in ts if t < 1}))
    t = lower[torch.randint(0, len(lower), (b, nf), generator=g)]
    return torch.where(torch.rand(b, nf, generator=g) < share, torch.ones(b, nf), t)


def _regression(
    student: VideoDenoiser,
    context: torch.Tensor,
    target: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    share: float,
    g: torch.Generator,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the student's x0 estimates of frames 1 on and `target` (the real clip, or
    `retarget.follow`'s frames), every frame seeing `context` before it. At t = 1 the input is pure
    noise; below, the target re-noised to t. `keep` (B, F) bool: the frames that count (all without it)."""
    b, nf = target.shape[:2]
    t = _student_times(b, nf, share, g)
    tb = t[..., None, None, None]
    eps = torch.randn(target.shape, generator=g)
    xt = (1 - tb) * target + tb * eps
    v = student.forward_parallel(context, xt, t, states, mask)
    err = (xt - tb * v - target)[:, 1:] ** 2
    if keep is None:
        return err.mean()
    w = keep[:, 1:].float()
    return (err.mean(dim=(2, 3, 4)) * w).sum() / w.sum().clamp(min=1)


def _rollout(
    student: VideoDenoiser,
    states: torch.Tensor,
    mask: torch.Tensor,
    frames: int,
    g: torch.Generator,
    first: torch.Tensor,
) -> torch.Tensor:
    """The student's own continuation of real first frames `first`, frame by frame through the cache, at
    a random 1–4 steps: the context the self-forcing stage trains on."""
    schedule = default_student_schedule()
    steps = int(torch.randint(1, 5, (1,), generator=g))
    shape = (states.shape[0], student.cfg.channels, student.cfg.size, student.cfg.size)
    student.eval()
    with torch.no_grad():
        text = student.text_kv(states, mask)
        out = student_stream(
            student, text, schedule, steps, frames, lambda f, k: torch.randn(shape, generator=g), first=first
        )
    student.train()
    return out.clone()  # out of inference mode: autograd may keep it


def train_student(
    r: VideoRecipe,
    encoder: TextEncoder,
    init: VideoDenoiser | None,
    steps: int,
    stage: str,
) -> tuple[VideoDenoiser, list[float]]:
    """Regression of frames 1 on onto the real clip, from `init` (a new network when None).

    Without `init`, teacher forcing: every frame sees the real (noise-augmented) earlier frames. From
    `init`, self-forcing: the student first continues each clip's real first frame on its own, through
    its cache, and every frame then sees those generated frames. A clip's first frame and caption fix
    the rest of it (one shape, constant speed, bounces), so the real frame is the right continuation of
    the student's own context, and the loss pulls the student back wherever its stream wanders. The
    rollouts grow from `frames` to `self_forcing_frames` over the stage."""
    self_forcing = init is not None
    g = torch.Generator().manual_seed(r.seed + (3 if self_forcing else 2))
    torch.manual_seed(r.seed + 2)
    student = copy.deepcopy(init).train() if init is not None else VideoDenoiser(r.config()).train()
    for p in student.parameters():
        p.requires_grad_(True)
    lr = r.student_lr if self_forcing else r.forcing_lr
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0 if self_forcing else 0.01)
    batch = r.student_batch if self_forcing else r.batch
    losses: list[float] = []
    progress = Progress(f"video {stage} step", steps, 50)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(50, steps // 10 + 1))
        frames = r.frames + (r.self_forcing_frames - r.frames) * step // max(steps - 1, 1) if self_forcing else r.frames
        video, _, caps = clips.batch(r.seed + 7, step + (10**6 if self_forcing else 0), batch, frames, r.size)
        states, mask = encoder.encode(caps)
        real = torch.from_numpy(video)
        if self_forcing:
            context = _rollout(student, states, mask, frames, g, first=real[:, 0])
        else:
            context = corrupt(real, r.context_noise, g)
        losses.append(optimise(opt, student, _regression(student, context, real, states, mask, r.one_step_share, g)))
        progress.update(loss=losses[-1])
    return student.eval(), losses


def train_long_rollouts(r: VideoRecipe, encoder: TextEncoder, init: VideoDenoiser) -> tuple[VideoDenoiser, list[float]]:
    """Self-forcing on long rollouts from `init`, each frame regressed onto the target `retarget.follow`
    draws for it (frames whose previous frame has no shape to follow are left out of the loss)."""
    g = torch.Generator().manual_seed(r.seed + 15)
    student = copy.deepcopy(init).train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=r.long_lr, weight_decay=0.0)
    losses: list[float] = []
    steps = r.long_steps
    progress = Progress("video long-rollouts step", steps, 25)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r.long_lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        frames = r.long_frames_from + (r.long_frames_to - r.long_frames_from) * step // max(steps - 1, 1)
        video, batch, caps = clips.batch(r.seed + 7, step + 2 * 10**6, r.student_batch, frames, r.size)
        states, mask = encoder.encode(caps)
        real = torch.from_numpy(video)
        context = _rollout(student, states, mask, frames, g, first=real[:, 0])
        target, keep = (torch.from_numpy(a) for a in retarget.follow(context.numpy(), batch, video[:, 0]))
        loss = _regression(student, context, target, states, mask, r.one_step_share, g, keep)
        losses.append(optimise(opt, student, loss))
        progress.update(loss=losses[-1])
    return student.eval(), losses
