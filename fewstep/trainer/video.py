"""`fewstep train video`: the video judge, the causal teacher, and the few-step causal students.

Stages: `judge` (the frame classifier, `video_judge`), `teacher`, `student` (teacher forcing,
then self-forcing), `evaluate` (`video_eval`: 256-frame streams, drift, the model card).

Data are procedural clips (trainer/clips.py), 16×16 by default. At 32×32 a frame is four times as
many tokens, and the attention over a clip grows with the square of that. The self-forcing stage
rolls the student out on its own outputs for every training step, and on 2 CPU cores that
budget decides the size.

**Teacher.** Every frame of a clip gets its own noise level t, drawn from a logit-normal as for the
image teacher. The network predicts each frame's flow velocity (ε − x₀) while seeing the earlier
frames as the bounded cache shows them at inference (`VideoDenoiser.forward_parallel`): teacher
forcing. The context frames carry Gaussian noise of a per-clip σ up to `context_noise`; without it
the teacher copied its own small errors forward frame after frame and shapes faded out within ~10
frames. 10 % of prompts are dropped for classifier-free guidance; the weights kept are an EMA.

**Students** start from the teacher and regress onto its samples (`teacher_targets`: `pair_steps`
Euler steps with CFG, every frame at once) at the timesteps of the 1–4 step schedules, so one
student serves 1–4 steps per frame with CFG baked in. *Teacher forcing*: every frame sees real
(noise-augmented) earlier frames. *Self-forcing*: each training step first rolls the student out on
its own outputs through its cache, and every frame then sees those generated frames, with the
teacher's targets computed on the same generated context.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.models.checkpoint import WEIGHTS, load_checkpoint, read_manifest, save_checkpoint
from fewstep.models.schedules import default_student_schedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache, TextKV, VideoConfig, VideoDenoiser, student_stream
from fewstep.trainer import clips, video_judge
from fewstep.trainer.image import encoder_meta
from fewstep.trainer.plots import save_curves
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import Ema, cosine_lr, drop_prompts

STAGES = ("judge", "teacher", "forcing", "self-forcing", "evaluate")
TEACHER_DIR = "shapes-video-teacher"
STUDENT_DIR = "shapes-video"
FORCING_ONLY_DIR = "shapes-video-forcing-only"
JUDGE_DIR = "shapes-video-judge"


@dataclass
class VideoRecipe:
    """Sizes and step counts of a run. `quick()` is the seconds-long smoke variant."""

    seed: int = 0
    size: int = 16
    patch: int = 4
    frames: int = 8
    dim: int = 64
    heads: int = 4
    layers: int = 3
    width: int = 32
    sink: int = 1
    window: int = 4
    teacher_steps: int = 2500
    batch: int = 24
    lr: float = 5e-4
    drop_prob: float = 0.1
    context_noise: float = 0.2
    """Most Gaussian noise (σ, per clip, drawn uniformly from 0) added to the clean context frames in
    training: a model shown only perfect context copies its own errors forward and fades out."""
    ema_decay: float = 0.999
    sampler_steps: int = 16
    guidance: float = 3.0
    judge_steps: int = 400
    pair_steps: int = 8
    student_batch: int = 16
    student_lr: float = 2e-4
    forcing_steps: int = 400
    self_forcing_steps: int = 1800
    default_steps: int = 2
    eval_streams: int = 32
    eval_frames: int = 256

    @classmethod
    def quick(cls) -> VideoRecipe:
        return cls(
            frames=4,
            dim=32,
            heads=2,
            layers=1,
            width=8,
            window=2,
            teacher_steps=3,
            batch=2,
            sampler_steps=2,
            judge_steps=3,
            pair_steps=2,
            student_batch=2,
            forcing_steps=2,
            self_forcing_steps=2,
            eval_streams=2,
            eval_frames=20,
        )

    def config(self) -> VideoConfig:
        return VideoConfig(
            size=self.size,
            patch=self.patch,
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
            width=self.width,
            sink=self.sink,
            window=self.window,
        )


def train_teacher(r: VideoRecipe, encoder: TextEncoder, log_every: int = 100) -> tuple[VideoDenoiser, list[float]]:
    """Teacher forcing with flow matching; returns the EMA network and the per-step losses."""
    torch.manual_seed(r.seed)
    g = torch.Generator().manual_seed(r.seed)
    net = VideoDenoiser(r.config()).train()
    ema = Ema(net, r.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=0.01)
    null_states, null_mask = encoder.encode([""])
    losses: list[float] = []
    progress = Progress("video teacher step", r.teacher_steps, log_every)
    for step in range(r.teacher_steps):
        for group in opt.param_groups:
            group["lr"] = r.lr * cosine_lr(step, r.teacher_steps, warmup=min(200, r.teacher_steps // 10 + 1))
        video, _, caps = clips.batch(r.seed, step, r.batch, r.frames, r.size)
        x0 = torch.from_numpy(video)
        states, mask = encoder.encode(caps)
        states, mask = drop_prompts(states, mask, null_states, null_mask, r.drop_prob, g)
        t = torch.sigmoid(torch.randn(r.batch, r.frames, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        tb = t[..., None, None, None]
        xt = (1 - tb) * x0 + tb * eps
        context = corrupt(x0, r.context_noise, g)
        loss = F.mse_loss(net.forward_parallel(context, xt, t, states, mask), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
        losses.append(loss.item())
        progress.update(loss=losses[-1])
    model = ema.module
    assert isinstance(model, VideoDenoiser)
    return model.eval(), losses


@torch.inference_mode()
def sample_stream(
    net: VideoDenoiser,
    text: TextKV,
    null: TextKV,
    frames: int,
    seeds: list[int],
    steps: int,
    guidance: float,
    first: torch.Tensor | None = None,
) -> np.ndarray:
    """Frames (B, frames, C, H, W) in [-1, 1], one at a time: Euler on each frame with CFG, then `write`.

    Two caches, conditional and unconditional, each fed the same finished frames. With `first`
    (B, C, H, W), frame 0 is given and the stream continues it.
    """
    cfg = net.cfg
    b = len(seeds)
    cache, null_cache = KVCache.empty(cfg, b), KVCache.empty(cfg, b)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    grid = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    if first is not None:
        net.write(first, text, cache)
        net.write(first, null, null_cache)
        out.append(first)
    for _ in range(len(out), frames):
        x = torch.stack([torch.randn(cfg.channels, cfg.size, cfg.size, generator=gen) for gen in gens])
        for k in range(steps):
            t = torch.full((b,), float(grid[k]))
            v_c = net.denoise(x, t, text, cache)
            v_u = net.denoise(x, t, null, null_cache)
            x = x + (grid[k + 1] - grid[k]) * (v_u + guidance * (v_c - v_u))
        x = x.clamp(-1, 1)
        net.write(x, text, cache)
        net.write(x, null, null_cache)
        out.append(x)
    return torch.stack(out, dim=1).numpy()


def corrupt(clean: torch.Tensor, max_sigma: float, g: torch.Generator) -> torch.Tensor:
    """Clips (B, F, C, H, W) with Gaussian noise of a per-clip σ ~ U(0, `max_sigma`): the context a model
    trains on, so that it restores imperfect earlier frames instead of copying their flaws (GameNGen's
    noise augmentation, without the noise level as an input)."""
    sigma = torch.rand(clean.shape[0], 1, 1, 1, 1, generator=g) * max_sigma
    return (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def teacher_targets(
    teacher: VideoDenoiser,
    context: torch.Tensor,
    z: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    null: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """The teacher's samples from noises `z` (B, F, C, H, W): Euler on the flow ODE with CFG, every
    frame at once, each seeing the clean frames of `context` before it. The student's targets."""
    b, nf = z.shape[:2]
    both_states = torch.cat([states, null[0].expand(b, -1, -1)])
    both_mask = torch.cat([mask, null[1].expand(b, -1)])
    both_context = torch.cat([context, context])
    grid = torch.linspace(1.0, 0.0, steps + 1)
    x = z
    for k in range(steps):
        t = torch.full((2 * b, nf), float(grid[k]))
        v_c, v_u = teacher.forward_parallel(both_context, torch.cat([x, x]), t, both_states, both_mask).chunk(2)
        x = x + (grid[k + 1] - grid[k]) * (v_u + guidance * (v_c - v_u))
    return x.clamp(-1, 1)


def _student_times(b: int, nf: int, g: torch.Generator) -> torch.Tensor:
    """Per-frame times: half the frames at t = 1 (the 1-step map), the rest at the lower timesteps
    of the 2–4 step schedules, which is where the re-noising sampler puts them."""
    lower = torch.tensor(sorted({t for ts in default_student_schedule().timesteps.values() for t in ts if t < 1}))
    t = lower[torch.randint(0, len(lower), (b, nf), generator=g)]
    return torch.where(torch.rand(b, nf, generator=g) < 0.5, torch.ones(b, nf), t)


def _regression(
    student: VideoDenoiser,
    context: torch.Tensor,
    z: torch.Tensor,
    x0: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    g: torch.Generator,
    skip_first: bool = False,
) -> torch.Tensor:
    """MSE between the student's x0 estimates and the targets `x0`, every frame seeing `context`
    (without frame 0 when `skip_first`)."""
    b, nf = z.shape[:2]
    t = _student_times(b, nf, g)
    tb = t[..., None, None, None]
    eps = torch.randn(x0.shape, generator=g)
    xt = torch.where(tb >= 1.0, z, (1 - tb) * x0 + tb * eps)
    v = student.forward_parallel(context, xt, t, states, mask)
    err = (xt - tb * v - x0) ** 2
    return err[:, 1:].mean() if skip_first else err.mean()


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
    teacher: VideoDenoiser | None,
    encoder: TextEncoder,
    init: VideoDenoiser,
    steps: int,
    stage: str,
) -> tuple[VideoDenoiser, list[float]]:
    """With a `teacher`, teacher forcing: regression on the teacher's samples, each frame seeing real
    (noise-augmented) earlier frames. Without one, self-forcing: the student continues each clip's real first frame
    on its own, through its cache, and every later frame is regressed onto the clip's real frame while
    seeing those generated frames. A clip's first frame and caption fix the rest of it (one shape, constant
    speed, bounces), so the real frame is the right continuation of the student's own context: the loss
    pulls the student back whenever its stream wanders, which teacher targets cannot do once the teacher
    itself fades on imperfect context (measured: see `docs/MODEL_CARD.md`)."""
    self_forcing = teacher is None
    g = torch.Generator().manual_seed(r.seed + (3 if self_forcing else 2))
    torch.manual_seed(r.seed + 2)
    student = copy.deepcopy(init).train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=r.student_lr, weight_decay=0.0)
    null = encoder.encode([""]) if teacher is not None else None
    losses: list[float] = []
    progress = Progress(f"video {stage} step", steps, 50)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r.student_lr * cosine_lr(step, steps, warmup=min(50, steps // 10 + 1))
        video, _, caps = clips.batch(
            r.seed + 7, step + (10**6 if self_forcing else 0), r.student_batch, r.frames, r.size
        )
        states, mask = encoder.encode(caps)
        real = torch.from_numpy(video)
        z = torch.randn(real.shape, generator=g)
        if null is None:
            context = _rollout(student, states, mask, r.frames, g, first=real[:, 0])
            loss = _regression(student, context, z, real, states, mask, g, skip_first=True)
        else:
            assert teacher is not None
            context = corrupt(real, r.context_noise, g)
            x0 = teacher_targets(teacher, context, z, states, mask, null, r.pair_steps, r.guidance)
            loss = _regression(student, context, z, x0, states, mask, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(loss=losses[-1])
    return student.eval(), losses


def _teacher_meta(folder: Path) -> dict[str, Any]:
    m = read_manifest(folder)
    return {
        "name": m["name"],
        "version": m.get("version"),
        "sha256": m["files"][WEIGHTS]["sha256"],
        "sampler": m["sampler"],
    }


def load_video_net(folder: Path) -> VideoDenoiser:
    """A video network from a checkpoint folder (hash-checked), in eval mode."""
    manifest, state = load_checkpoint(folder)
    net = VideoDenoiser(VideoConfig(**manifest["architecture"]["config"]))
    net.load_state_dict(state)
    return net.eval()


def stage_judge(r: VideoRecipe, out: Path) -> None:
    t0 = time.time()
    model = video_judge.train_frame_classifier(r.seed, r.judge_steps, r.size)
    videos, targets = video_judge.real_streams(r.seed + 1, 256, 32, r.size)
    scores = video_judge.score_streams(model, videos, targets)
    save_checkpoint(
        out / JUDGE_DIR,
        model.state_dict(),
        {
            "name": JUDGE_DIR,
            "version": "1",
            "kind": "classifier",
            "architecture": {"class": "AttributeClassifier", "input": f"{r.size}x{r.size}"},
            "metrics": {"real_clips": scores.window(0, 32), "real_clips_n": 256},
            "trainer": {"steps": r.judge_steps, "seed": r.seed, "seconds": round(time.time() - t0, 1)},
        },
    )


def stage_teacher(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    t0 = time.time()
    net, losses = train_teacher(r, encoder)
    save_curves({"flow matching": losses}, docs / "video_teacher_loss.png", "video teacher")
    save_checkpoint(
        out / TEACHER_DIR,
        net.state_dict(),
        {
            "name": TEACHER_DIR,
            "version": "1",
            "kind": "video-teacher",
            "architecture": {"class": "VideoDenoiser", "config": r.config().to_dict()},
            "text_encoder": encoder_meta(),
            "native_size": f"{r.size}x{r.size}",
            "sampler": {"steps": r.sampler_steps, "guidance": r.guidance},
            "trainer": {
                "recipe": asdict(r),
                "seconds": round(time.time() - t0, 1),
                "final_loss": float(np.mean(losses[-20:])),
            },
        },
    )


def _student_manifest(r: VideoRecipe, name: str, kind: str, teacher: Path, extra: dict[str, Any]) -> dict[str, Any]:
    schedule = replace(default_student_schedule(), default_steps=r.default_steps)
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "architecture": {"class": "VideoDenoiser", "config": r.config().to_dict()},
        "text_encoder": encoder_meta(),
        "native_size": f"{r.size}x{r.size}",
        "schedule": schedule.to_dict(),
        "teacher": _teacher_meta(teacher),
        "trainer": {"recipe": asdict(r), **extra},
    }


def stage_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The teacher-forcing student, from the teacher's weights: kept as the model card's ablation."""
    teacher = load_video_net(out / TEACHER_DIR)
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    forced, losses = train_student(r, teacher, encoder, teacher, r.forcing_steps, "teacher-forcing")
    extra = {"teacher_forcing": {"steps": r.forcing_steps, "seconds": round(time.time() - t0, 1)}}
    manifest = _student_manifest(r, FORCING_ONLY_DIR, "video-ablation", out / TEACHER_DIR, extra)
    save_checkpoint(out / FORCING_ONLY_DIR, forced.state_dict(), manifest)
    save_curves({"teacher forcing": losses}, docs / "video_forcing_loss.png", "video student, teacher forcing")


def stage_self_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The served student: self-forcing from the teacher-forcing student."""
    forced = load_video_net(out / FORCING_ONLY_DIR)
    t0 = time.time()
    student, losses = train_student(r, None, encoder, forced, r.self_forcing_steps, "self-forcing")
    extra = dict(read_manifest(out / FORCING_ONLY_DIR)["trainer"])
    extra.pop("recipe", None)
    extra["self_forcing"] = {"steps": r.self_forcing_steps, "seconds": round(time.time() - t0, 1)}
    save_checkpoint(
        out / STUDENT_DIR, student.state_dict(), _student_manifest(r, STUDENT_DIR, "video", out / TEACHER_DIR, extra)
    )
    save_curves({"self-forcing": losses}, docs / "video_self_forcing_loss.png", "video student, self-forcing")


def run(stages: list[str], out: Path, docs: Path, recipe: VideoRecipe, threads: int) -> None:
    torch.set_num_threads(threads)
    encoder = TextEncoder()
    for stage in stages:
        print(f"[train video] stage {stage}", flush=True)
        t0 = time.time()
        if stage == "judge":
            stage_judge(recipe, out)
        elif stage == "teacher":
            stage_teacher(recipe, out, docs, encoder)
        elif stage == "forcing":
            stage_forcing(recipe, out, docs, encoder)
        elif stage == "self-forcing":
            stage_self_forcing(recipe, out, docs, encoder)
        elif stage == "evaluate":
            from fewstep.trainer.video_eval import stage_evaluate

            stage_evaluate(recipe, out, docs, encoder)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        print(f"[train video] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
