"""`fewstep train video`: the video judge, the causal teacher, and the few-step causal students.

Stages: `judge` (the frame classifier, `video_judge`), `teacher`, `forcing` (the teacher-forcing
student), `self-forcing` and `long-rollouts` (the served student), `evaluate` (`video_eval`:
256-frame streams, drift, the model card).

Data are procedural clips (trainer/clips.py), 16×16 by default. At 32×32 a frame is four times as
many tokens, and the attention over a clip grows with the square of that. The self-forcing stage
rolls the student out on its own outputs for every training step, and on 2 CPU cores that
budget decides the size.

**Image to video.** Every stream's frame 0 is drawn by the image student (`trainer/image.py`, named
by sha256 in the video manifests' `first_frame`), so the video models learn frames 1 on only: at
16×16 no network learned to draw the shapes from scratch in this budget
(`docs/experiments/video_quality`), while the image student draws them in one step.

**Teacher.** Every frame of a clip gets its own noise level t, drawn from a logit-normal as for the
image teacher. The network predicts each frame's flow velocity (ε − x₀) while seeing the earlier
frames as the bounded cache shows them at inference (`VideoDenoiser.forward_parallel`): teacher
forcing. The context frames carry Gaussian noise of a per-clip σ up to `context_noise`; without it
the teacher copied its own small errors forward frame after frame and shapes faded out within ~10
frames. 10 % of prompts are dropped for classifier-free guidance; the weights kept are an EMA.

**Students** learn the 1–4 step schedules by x0 regression onto the real clip at the schedules'
timesteps (`one_step_share` of frames at t = 1, from pure noise). *Teacher forcing* (a new network):
every frame sees real (noise-augmented) earlier frames. *Self-forcing* (from the teacher-forcing
student): each training step first rolls the student out on its own outputs through its cache, from
the clip's real first frame, and every frame then sees those generated frames. Measured in
`docs/experiments/video_quality` (E9–E12): regression alone moves the shapes right and erodes them
over tens of frames; self-forcing on its own rollouts trains most of that erosion away.

*Long rollouts* (from the self-forcing student): rollouts growing from `long_frames_from` to
`long_frames_to` frames, each frame regressed onto the clip's shape redrawn one step on from where the
rollout's previous frame has it (`retarget.follow`), not onto the real clip, which long rollouts
leave (E13–E14). It trains the student to restore worn shapes deep into a stream (E15b: frames
241–256 joint 0.672 → 0.822 at 2 steps).
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

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import MANIFEST, WEIGHTS, load_checkpoint, read_manifest, save_checkpoint
from fewstep.models.schedules import default_student_schedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache, TextKV, VideoConfig, VideoDenoiser, student_stream
from fewstep.trainer import clips, retarget, video_judge
from fewstep.trainer.image import STUDENT_DIR as IMAGE_STUDENT_DIR
from fewstep.trainer.image import encoder_meta
from fewstep.trainer.plots import save_curves
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import Ema, cosine_lr, drop_prompts

STAGES = ("judge", "teacher", "forcing", "self-forcing", "long-rollouts", "evaluate")
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
    width: int = 48
    sink: int = 1
    window: int = 4
    residual: bool = True
    teacher_steps: int = 1200
    batch: int = 24
    lr: float = 1e-3
    drop_prob: float = 0.1
    context_noise: float = 0.2
    """Most Gaussian noise (σ, per clip, drawn uniformly from 0) added to the clean context frames in
    training: a model shown only perfect context copies its own errors forward and fades out."""
    ema_decay: float = 0.999
    sampler_steps: int = 16
    guidance: float = 3.0
    judge_steps: int = 400
    forcing_steps: int = 2000
    forcing_lr: float = 1e-3
    one_step_share: float = 0.7
    """Share of training frames at t = 1 (the 1-step map, and every stream's first step); the rest are at
    the lower timesteps of the 2–4 step schedules."""
    student_batch: int = 16
    student_lr: float = 2e-4
    self_forcing_steps: int = 800
    self_forcing_frames: int = 16
    """Rollout length at the end of the self-forcing stage: it grows from `frames` to this, so the student
    meets its own output after longer and longer stretches of itself. (Longer rollouts with the loss on
    their last frames did worse: `docs/experiments/video_quality`, E13.)"""
    long_steps: int = 300
    long_frames_from: int = 16
    long_frames_to: int = 48
    long_lr: float = 1e-4
    """The `long-rollouts` stage: steps, rollout length growing from/to, and learning rate."""
    default_steps: int = 2
    eval_streams: int = 32
    eval_frames: int = 256
    check_streams: int = 128
    """Streams of the served student's drift check at the default steps. The model card's tables use
    `eval_streams`, too few to tell a few points apart late in a stream: a stream that loses its shape
    keeps it lost, so each stream is about one sample (± 0.07 at 32 streams)."""

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
            student_batch=2,
            forcing_steps=2,
            self_forcing_steps=2,
            self_forcing_frames=12,
            long_steps=2,
            long_frames_from=6,
            long_frames_to=8,
            eval_streams=2,
            eval_frames=20,
            check_streams=3,
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
            residual=self.residual,
        )


def train_teacher(r: VideoRecipe, encoder: TextEncoder, log_every: int = 100) -> tuple[VideoDenoiser, list[float]]:
    """Teacher forcing with flow matching; returns the EMA network and the per-step losses.

    Frame 0 is given at inference (the image student draws it), so only frames 1 on are trained."""
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
        v = net.forward_parallel(context, xt, t, states, mask)
        losses.append(_update(opt, net, F.mse_loss(v[:, 1:], (eps - x0)[:, 1:])))
        ema.update(net)
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


def _update(opt: torch.optim.Optimizer, net: torch.nn.Module, loss: torch.Tensor) -> float:
    """One optimiser step on `loss` with the gradient norm clipped to 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.item()


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
        losses.append(_update(opt, student, _regression(student, context, real, states, mask, r.one_step_share, g)))
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
        losses.append(_update(opt, student, loss))
        progress.update(loss=losses[-1])
    return student.eval(), losses


def _model_ref(folder: Path) -> dict[str, Any]:
    """How a manifest names another model: by name, version and the sha256 of its weights."""
    m = read_manifest(folder)
    return {"name": m["name"], "version": m.get("version"), "sha256": m["files"][WEIGHTS]["sha256"]}


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


def _student_manifest(r: VideoRecipe, name: str, kind: str, first_frame: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """`first_frame`: the image student that draws every stream's frame 0 (`engines.video`)."""
    schedule = replace(default_student_schedule(), default_steps=r.default_steps)
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "architecture": {"class": "VideoDenoiser", "config": r.config().to_dict()},
        "text_encoder": encoder_meta(),
        "native_size": f"{r.size}x{r.size}",
        "schedule": schedule.to_dict(),
        "first_frame": _model_ref(first_frame),
        "trainer": {"recipe": asdict(r), **extra},
    }


def stage_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The teacher-forcing student, a new network: kept as the model card's ablation."""
    t0 = time.time()
    forced, losses = train_student(r, encoder, None, r.forcing_steps, "teacher-forcing")
    extra = {"teacher_forcing": {"steps": r.forcing_steps, "seconds": round(time.time() - t0, 1)}}
    manifest = _student_manifest(r, FORCING_ONLY_DIR, "video-ablation", out / IMAGE_STUDENT_DIR, extra)
    save_checkpoint(out / FORCING_ONLY_DIR, forced.state_dict(), manifest)
    save_curves({"teacher forcing": losses}, docs / "video_forcing_loss.png", "video student, teacher forcing")


def stage_self_forcing(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The served student: self-forcing from the teacher-forcing student."""
    forced = load_video_net(out / FORCING_ONLY_DIR)
    t0 = time.time()
    student, losses = train_student(r, encoder, forced, r.self_forcing_steps, "self-forcing")
    extra = dict(read_manifest(out / FORCING_ONLY_DIR)["trainer"])
    extra.pop("recipe", None)
    extra["self_forcing"] = {"steps": r.self_forcing_steps, "seconds": round(time.time() - t0, 1)}
    manifest = _student_manifest(r, STUDENT_DIR, "video", out / IMAGE_STUDENT_DIR, extra)
    save_checkpoint(out / STUDENT_DIR, student.state_dict(), manifest)
    save_curves({"self-forcing": losses}, docs / "video_self_forcing_loss.png", "video student, self-forcing")


def stage_long_rollouts(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    """The served student, continued on long rollouts. It continues the `self-forcing` stage's student
    once: a student that already had this stage is refused (run `self-forcing` first)."""
    trainer = read_manifest(out / STUDENT_DIR)["trainer"]
    if "long_rollouts" in trainer:
        raise CheckpointError(
            f"{out / STUDENT_DIR} already had the long-rollouts stage: run the `self-forcing` stage first"
        )
    t0 = time.time()
    student, losses = train_long_rollouts(r, encoder, load_video_net(out / STUDENT_DIR))
    extra = {k: v for k, v in trainer.items() if k != "recipe"}
    extra["long_rollouts"] = {"steps": r.long_steps, "seconds": round(time.time() - t0, 1)}
    manifest = _student_manifest(r, STUDENT_DIR, "video", out / IMAGE_STUDENT_DIR, extra)
    save_checkpoint(out / STUDENT_DIR, student.state_dict(), manifest)
    save_curves({"long rollouts": losses}, docs / "video_long_rollouts_loss.png", "video student, long rollouts")


def run(stages: list[str], out: Path, docs: Path, recipe: VideoRecipe, threads: int) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from {STAGES}")
    needs_image = {"forcing", "self-forcing", "long-rollouts", "evaluate"} & set(stages)
    if needs_image and not (out / IMAGE_STUDENT_DIR / MANIFEST).is_file():
        raise CheckpointError(
            f"stage {sorted(needs_image)[0]!r} needs the image student that draws every stream's first frame "
            f"({out / IMAGE_STUDENT_DIR}): run `fewstep train image` first"
        )
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
        elif stage == "long-rollouts":
            stage_long_rollouts(recipe, out, docs, encoder)
        elif stage == "evaluate":
            from fewstep.trainer.video_eval import stage_evaluate

            stage_evaluate(recipe, out, docs, encoder)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        print(f"[train video] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
