"""Evaluation of the video models over long streams, written to `docs/MODEL_CARD.md`.

Every model makes `eval_streams` streams of `eval_frames` frames (256 by default) from held-out
captions ("a video of a … that moves … …", a template never used in training), each seeded so
that the served engine makes the very same stream: frame 0 from the image student the manifest
names (`first_frame`), at the same seed and step count, and the rest from the video model. The
video judge (`video_judge`) scores every frame: shape and colour as prompted, and motion along the
prompted axis at the prompted speed, bounces included. Drift is the change from frames 1–16 to frames 241–256.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.evaluation import clips, shapes
from fewstep.evaluation.classifier import AttributeClassifier, load_classifier
from fewstep.evaluation.motion import (
    PASSING,
    SPAN,
    SPEED_HIGH,
    SPEED_LOW,
    StreamScores,
    score_streams,
    speed_band,
)
from fewstep.models.sampling import frame_from_image, frame_noise, student_sample_mixed, student_stream, to_pixels
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser, as_denoiser, load_unet
from fewstep.models.video import VideoDenoiser, load_video_net
from fewstep.models.video_cache import VideoConfig
from fewstep.trainer.plots import save_grid
from fewstep.trainer.report import update_metrics, write_card_section
from fewstep.trainer.stages import (
    FORCING_ONLY_DIR,
    STUDENT_DIR,
    VIDEO_JUDGE_DIR,
    VIDEO_STUDENT_DIR,
    VIDEO_TEACHER_DIR,
    VideoRecipe,
)
from fewstep.trainer.video_judge import motion_confusion
from fewstep.trainer.video_teacher import sample_stream

WINDOW = 16
"""Frames per reported window: the first 16 and the last 16 of a stream."""
CONFUSION_CLIPS, CONFUSION_FRAMES = 256, 64
"""Real clips (the judge stage's `real_clips`, longer) on which the card shows the motion rule telling
slow from quick and the wrong direction from the right one."""
SEED_BASE = 5_000_000


def eval_prompts(r: VideoRecipe) -> tuple[list[clips.Clip], list[str]]:
    """The held-out clips every model is judged on, and their captions."""
    rng = np.random.default_rng([r.seed, 271828])
    targets = clips.sample_clips(rng, r.eval_streams)
    return targets, [clips.caption(c, rng, clips.HELDOUT_TEMPLATES) for c in targets]


@dataclass(frozen=True)
class ImageStudent:
    """The image student that draws frame 0 of every stream, as the served video engine runs it."""

    net: Denoiser
    schedule: FewStepSchedule
    encoder: TextEncoder

    @classmethod
    def load(cls, folder: Path, encoder: TextEncoder) -> ImageStudent:
        manifest, unet = load_unet(folder)
        schedule = FewStepSchedule.from_dict(manifest["schedule"])
        return cls(as_denoiser(unet, schedule.timestep_scale), schedule, encoder)

    def first_frames(self, prompts: list[str], seeds: list[int], steps: int, size: int) -> torch.Tensor:
        """Frame 0 of every stream: (B, C, size, size) in [-1, 1]."""
        states, mask = self.encoder.encode(prompts)
        x0 = student_sample_mixed(self.net, self.schedule, [steps] * len(seeds), states, mask, seeds)
        return torch.stack([frame_from_image(px, size) for px in to_pixels(x0)])


def _windows(scores: StreamScores, frames: int) -> tuple[dict[str, float], dict[str, float]]:
    return scores.window(0, min(WINDOW, frames)), scores.window(max(0, frames - WINDOW), frames)


def _row(name: str, steps: int, nfe: int, scores: StreamScores, frames: int, seconds: float) -> dict:
    early, late = _windows(scores, frames)
    return {
        "model": name,
        "steps": steps,
        "nfe_per_frame": nfe,
        "first_frame": scores.window(0, 1),
        "early": early,
        "late": late,
        "seconds": seconds,
    }


def _continuation_row(name: str, steps: int, scores: StreamScores, frames: int) -> dict:
    """A stream that was given the real first frame: judged from frame 2 on (frame 1 is the real one)."""
    return {
        "model": name,
        "steps": steps,
        "early": scores.window(1, min(WINDOW + 1, frames)),
        "late": scores.window(max(1, frames - WINDOW), frames),
    }


def _fmt_continuation(row: dict) -> str:
    e, lt = row["early"], row["late"]
    cells = [f"{d[k]:.3f}" for d in (e, lt) for k in ("shape", "colour", "joint", "motion")]
    cells += [f"{(lt['joint'] - e['joint']) * 100:+.1f}", f"{(lt['motion'] - e['motion']) * 100:+.1f}"]
    return f"| {row['model']} | {row['steps']} | " + " | ".join(cells) + " |"


def _fmt(row: dict) -> str:
    e, lt = row["early"], row["late"]
    cells = [f"{row['first_frame']['joint']:.3f}"]
    cells += [f"{e[k]:.3f}" for k in ("shape", "colour", "joint", "motion")]
    cells += [f"{lt[k]:.3f}" for k in ("shape", "colour", "joint", "motion")]
    cells += [f"{(lt['joint'] - e['joint']) * 100:+.1f}", f"{(lt['motion'] - e['motion']) * 100:+.1f}"]
    return f"| {row['model']} | {row['steps']} | {row['nfe_per_frame']} | " + " | ".join(cells) + " |"


def stage_evaluate(r: VideoRecipe, out: Path, docs: Path, encoder: TextEncoder) -> None:
    judge = load_classifier(out / VIDEO_JUDGE_DIR)
    targets, prompts = eval_prompts(r)
    frames, n = r.eval_frames, len(targets)
    seeds = [SEED_BASE + i for i in range(n)]
    states, mask = encoder.encode(prompts)
    rows: list[dict[str, Any]] = []
    continued: list[dict[str, Any]] = []
    streams: dict[str, np.ndarray] = {}

    rng = np.random.default_rng([r.seed, 314159])
    real = np.stack([clips.render(c, frames, rng, r.size) for c in targets])
    first = torch.from_numpy(real[:, 0])
    rows.append(_row("real clips", 0, 0, score_streams(judge, real, targets), frames, 0.0))

    image = ImageStudent.load(out / STUDENT_DIR, encoder)
    firsts: dict[int, torch.Tensor] = {}
    students: dict[str, VideoDenoiser] = {
        "self-forcing": load_video_net(out / VIDEO_STUDENT_DIR),
        "teacher forcing only": load_video_net(out / FORCING_ONLY_DIR),
    }
    schedule = FewStepSchedule.from_dict(
        json.loads((out / VIDEO_STUDENT_DIR / "manifest.json").read_text())["schedule"]
    )
    for name, net in students.items():
        text = net.text_kv(states, mask)

        def noise(f: int, k: int, cfg: VideoConfig = net.cfg) -> torch.Tensor:
            return frame_noise(seeds, f, k, cfg)

        for steps in schedule.steps:
            t0 = time.time()
            if steps not in firsts:
                firsts[steps] = image.first_frames(prompts, seeds, steps, r.size)
            video = student_stream(net, text, schedule, steps, frames, noise, first=firsts[steps]).numpy()
            seconds = round(time.time() - t0, 1)
            rows.append(_row(name, steps, steps, score_streams(judge, video, targets), frames, seconds))
            print(f"  {name} {steps} steps: {rows[-1]['early']} → {rows[-1]['late']} ({seconds}s)", flush=True)
            if steps == schedule.default_steps:
                streams[name] = video
                video = student_stream(net, text, schedule, steps, frames, noise, first=first).numpy()
                scores = score_streams(judge, video, targets)
                continued.append(_continuation_row(name, steps, scores, frames))

    teacher = load_video_net(out / VIDEO_TEACHER_DIR)
    null_states, null_mask = encoder.encode([""] * n)
    cond, null = teacher.text_kv(states, mask), teacher.text_kv(null_states, null_mask)
    t0 = time.time()
    torch.manual_seed(r.seed)
    video = sample_stream(
        teacher, cond, null, frames, seeds, r.sampler_steps, r.guidance, first=firsts[schedule.default_steps]
    )
    scores = score_streams(judge, video, targets)
    rows.append(_row("teacher", r.sampler_steps, 2 * r.sampler_steps, scores, frames, round(time.time() - t0, 1)))
    streams["teacher"] = video
    video = sample_stream(teacher, cond, null, frames, seeds, r.sampler_steps, r.guidance, first=first)
    scores = score_streams(judge, video, targets)
    continued.append(_continuation_row("teacher", r.sampler_steps, scores, frames))

    check = _drift_check(r, students["self-forcing"], schedule, image, encoder, judge)
    update_metrics(out / VIDEO_STUDENT_DIR, {"drift_check": check})
    confusion = motion_confusion(r.seed + 1, CONFUSION_CLIPS, CONFUSION_FRAMES, r.size)
    update_metrics(
        out / VIDEO_JUDGE_DIR,
        {"motion_confusion": confusion, "motion_confusion_clips": {"n": CONFUSION_CLIPS, "frames": CONFUSION_FRAMES}},
    )
    for name, folder in (("self-forcing", VIDEO_STUDENT_DIR), ("teacher forcing only", FORCING_ONLY_DIR)):
        update_metrics(out / folder, {"streams": [row for row in rows if row["model"] == name]})
    _filmstrip(docs, streams, frames)
    _drift_plot(docs, judge, streams, targets, frames)
    _write_card(docs, r, rows, continued, prompts, frames, n, check, confusion)


def _drift_check(
    r: VideoRecipe,
    net: VideoDenoiser,
    schedule: FewStepSchedule,
    image: ImageStudent,
    encoder: TextEncoder,
    judge: AttributeClassifier,
) -> dict[str, Any]:
    """The served student at the default steps on `r.check_streams` held-out streams (from the image
    student's first frames, as served): frames 1–16 and the last 16, with the late joint accuracy's
    standard error counting each stream as one sample."""
    targets, prompts = eval_prompts(replace(r, eval_streams=r.check_streams))
    seeds = [SEED_BASE + i for i in range(len(targets))]
    steps, frames = schedule.default_steps, r.eval_frames
    first = image.first_frames(prompts, seeds, steps, r.size)

    def noise(f: int, k: int) -> torch.Tensor:
        return frame_noise(seeds, f, k, net.cfg)

    video = student_stream(net, net.text_kv(*encoder.encode(prompts)), schedule, steps, frames, noise, first=first)
    scores = score_streams(judge, video.numpy(), targets)
    early, late = _windows(scores, frames)
    per_stream = (scores.shape & scores.colour)[:, max(0, frames - WINDOW) :].mean(axis=1)
    se = float(per_stream.std(ddof=1) / np.sqrt(len(per_stream))) if len(per_stream) > 1 else float("nan")
    print(f"  drift check, {len(targets)} streams at {steps} steps: {early} → {late} (± {se:.3f})", flush=True)
    return {
        "streams": len(targets),
        "steps": steps,
        "frames": frames,
        "early": early,
        "late": late,
        "late_joint_se": se,
    }


def _filmstrip(docs: Path, streams: dict[str, np.ndarray], frames: int, rows: int = 3) -> None:
    """Rows: each model on the same first `rows` streams; columns: frames 1–16, then the last 16."""
    picked = []
    for s in range(min(rows, len(next(iter(streams.values()))))):
        for video in streams.values():
            picked.append(np.concatenate([video[s, :WINDOW], video[s, max(0, frames - WINDOW) :]]))
    save_grid(np.concatenate(picked), docs / "video_filmstrip.png", cols=2 * min(WINDOW, frames), scale=3)


def _drift_plot(
    docs: Path, judge: AttributeClassifier, streams: dict[str, np.ndarray], targets: list[clips.Clip], frames: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    k = 8
    for name, video in streams.items():
        sc = score_streams(judge, video, targets)
        for ax, series in zip(axes, ((sc.shape & sc.colour).mean(0), sc.motion.mean(0)), strict=True):
            smooth = np.convolve(series.astype(float), np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth, label=name)
    for ax, title in zip(axes, ("joint (shape and colour) accuracy", "motion accuracy"), strict=True):
        ax.set_xlabel("frame")
        ax.set_title(f"{title}, running mean of {k}")
        ax.set_ylim(0, 1.02)
        ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "video_drift.png")
    plt.close(fig)


def _header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def _write_card(
    docs: Path,
    r: VideoRecipe,
    rows: list[dict],
    continued: list[dict],
    prompts: list[str],
    frames: int,
    n: int,
    check: dict[str, Any],
    confusion: dict[str, dict[str, float]],
) -> None:
    late = f"{frames - WINDOW + 1}–{frames}"
    ce, cl = check["early"], check["late"]
    curves = " ".join(
        f"![{name}]({png})"
        for name, png in (
            ("video teacher loss", "video_teacher_loss.png"),
            ("teacher forcing loss", "video_forcing_loss.png"),
            ("self-forcing loss", "video_self_forcing_loss.png"),
            ("long rollouts loss", "video_long_rollouts_loss.png"),
        )
        if (docs / png).is_file()
    )
    table = "\n".join(_fmt(row) for row in rows)
    rest = ["colour", "joint", "motion", f"{late} shape", "colour", "joint", "motion", "Δ joint", "Δ motion"]
    header = _header(["model", "steps", "NFE/frame", "frame 1 joint", "1–16 shape", *rest])
    continued_header = _header(["model", "steps", "2–17 shape", *rest])
    continued_table = "\n".join(_fmt_continuation(row) for row in continued)
    px = r.size / shapes.SIZE  # clip attributes are in pixels at the renderer's 32×32
    boundary = speed_band("quickly", r.size)[0]  # the lower edge of the faster speed
    confusion_header = _header(
        ["true speed", "clips", "prompted", "other speed", "other axis", "other way: first step", "other way: all"]
    )
    confusion_table = "\n".join(
        f"| {speed} | {c['streams']:.0f} | {c['prompted']:.3f} ({c['streams_prompted']:.2f}) "
        f"| {c['other_speed']:.3f} ({c['streams_other_speed']:.2f}) | {c['other_axis']:.3f} "
        f"| {c['reversed_frame_1']:.3f} | {c['reversed']:.3f} |"
        for speed, c in confusion.items()
    )
    body = f"""
## Video models: `{VIDEO_STUDENT_DIR}` (student), `{FORCING_ONLY_DIR}` (ablation) and `{VIDEO_TEACHER_DIR}`

Produced by `fewstep train video` (seed {r.seed}); this section is rewritten by its `evaluate` stage.

**Data.** Procedural clips at {r.size}×{r.size}: one shape (circle, square, triangle, cross, radius
{clips.MIN_RADIUS * px:g}–{clips.MAX_RADIUS * px:g} px: the still images' sizes, halved) in one of five colours on a
black, gray or white background, moving left, right, up or down, slowly ({clips.SPEEDS["slowly"] * px:g} px/frame)
or quickly ({clips.SPEEDS["quickly"] * px:g} px/frame), bouncing off the walls. Captions name all four.
16×16 rather than 32×32: every training step of the self-forcing stage rolls the student out frame by
frame, and 2 CPU cores pay for a frame's pixels and tokens many times over.

**Image to video.** Frame 0 of every stream is drawn by the image student (`{STUDENT_DIR}`, named by
sha256 in the video manifest's `first_frame`) from the same prompt, seed and step count, at 32×32, and
averaged down to {r.size}×{r.size}; the video models continue it. At 16×16 no network learned to draw the
shapes from scratch in this CPU budget (`docs/decisions/video-quality.md`), while the image student
draws them in one step. `hybrid` streams take their first frame from the image hybrid (the image teacher
over the first interval, handed off as the image student's manifest says, then the image student).

**Network** (`models/video.py`). Per frame a small U-Net (width {r.width}) whose
{r.size // r.patch}×{r.size // r.patch} bottleneck is {r.layers} transformer layers (dim {r.dim}, {r.heads} heads).
Each layer attends to the prompt (keys/values computed once per prompt), to the cached clean frames in
view (an attention sink of {r.sink} frame and a rolling window of {r.window}), and to the frame itself. The
cache has a static shape, so a frame costs the same at frame 10 and at frame 10 000. The timestep and
the pooled prompt reach every convolution level, and the network predicts a frame as the previous
clean frame plus a correction (`residual`): a video's next frame is mostly its last one.

**Training.** Frames 1 on (frame 0 is given). Teacher: flow matching with teacher forcing (each frame
noised, earlier frames real with Gaussian noise of σ up to {r.context_noise}), CFG by prompt dropout,
{r.teacher_steps} steps of {r.batch} clips × {r.frames} frames. The students learn the 1–4 step schedules by x0
regression onto the real clip at their timesteps ({r.one_step_share:.0%} of frames at t = 1, from pure noise):
- *teacher forcing* ({r.forcing_steps} steps from a new network): each frame sees the real (noise-augmented)
  earlier frames;
- *self-forcing* ({r.self_forcing_steps} more steps from the teacher-forcing student): each step the student
  continues the clip's real first frame on its own, through its KV cache (1–4 steps per frame, drawn per
  batch; rollouts growing from {r.frames} to {r.self_forcing_frames} frames over the stage), and every later frame,
  seeing those generated frames, is regressed onto the clip's real frame. A first frame and a caption fix
  the whole clip, so the real frame is the right continuation of the student's own context: the student
  is trained on the inputs it meets when it streams (Self-Forcing's point), with the data as the target
  where Self-Forcing uses a distribution-matching loss against the teacher;
- *long rollouts* ({r.long_steps} more steps of self-forcing, lr {r.long_lr:g}): rollouts growing from
  {r.long_frames_from} to {r.long_frames_to} frames, where the real clip stops being a target (a rollout leaves
  the clip's track within a few tens of frames). Each frame is regressed instead onto the clip's shape,
  size and colours redrawn clean one step of the caption's motion on from where the rollout's previous
  frame has the shape (`trainer/retarget.py`): the student learns to restore worn shapes deep into a
  stream, at a place its context predicts. The served student (the *self-forcing* rows below) has had
  this stage.

The students are trained on the clips, not on the teacher's samples: regression onto a teacher's
samples can only be as good as the teacher, and on its own imperfect context this one fades (measured
in the continuation table below). The teacher is the multi-step reference the students are compared with.

**Judge** (`evaluation/motion.py`): a frame classifier (shape, colour) trained on clip frames, and a
centroid tracker for motion: a frame is right when its displacement over the last {SPAN} frames runs along
the prompted axis at the prompted speed (nearer it than the other speed: the boundary is their mean,
{boundary:.2f} px/frame, and within {SPEED_LOW:g}–{SPEED_HIGH:g} × it), and changes sign only where the shape
turns next to the wall it was heading for (a bounce). A window that holds a bounce has no speed of its
own: it takes that of the clean steps around it. The rule on {CONFUSION_CLIPS} real clips of {CONFUSION_FRAMES}
frames: the share of frames 2–{CONFUSION_FRAMES} judged right when the prompt names the clip's motion, the
other speed, the other axis or the other way (in brackets, the share of clips with at least {PASSING:.0%} of
their frames right). A clip played the other way is wrong only at its start: after its first bounce it
moves as prompted.

{confusion_header}
{confusion_table}

**Drift over {frames} frames.** {n} held-out prompts (e.g. {prompts[0]!r}), one seed each, the same
seeds for every model. Accuracies over frames 1–16 and {late}; Δ in points.

{header}
{table}

**The served student's drift, measured closely.** The table's {n} streams are too few to tell a few
points apart late in a stream: a stream that loses its shape keeps it lost, so each stream counts about
once. The self-forcing student at its default {check["steps"]} steps on {check["streams"]} other held-out streams
(prompts, seeds and image first frames drawn the same way): frames 1–16 joint {ce["joint"]:.3f}, motion
{ce["motion"]:.3f}; frames {late} joint **{cl["joint"]:.3f}** (± {check["late_joint_se"]:.3f}, one standard error),
motion {cl["motion"]:.3f}: Δ joint {(cl["joint"] - ce["joint"]) * 100:+.1f}, Δ motion \
{(cl["motion"] - ce["motion"]) * 100:+.1f} points.

The teacher's NFE counts CFG's two evaluations per step (frame 0's image-student steps are not
counted). Student rows at the default step count ({r.default_steps}) are the filmstrip's. *Frame 1 joint* is the
first frame alone: the image student's, at the row's step count (the teacher continues the default's).

**Continuing a real first frame.** The same prompts and seeds, but every model is given the clip's
real first frame and makes the rest: this separates how well a model continues a stream from how well
it starts one. Judged from frame 2.

{continued_header}
{continued_table}

Filmstrip (rows: the self-forcing student, the teacher-forcing-only student, the teacher, on the same
three prompts; columns: frames 1–16, then frames {late}):

![video filmstrip](video_filmstrip.png)

Per-frame accuracy over the stream: ![drift](video_drift.png)

Training curves: {curves}
"""
    write_card_section(docs, "video-eval", body)
