# E15: self-forcing on longer rollouts with targets that follow the rollout's own track. For every
# rollout frame the tracker reads where the student put the shape; the target is the clip's shape, colours
# and size redrawn clean at that place. The real clip is not the target past frame 0, so a rollout that
# left the clip's track is still regressed onto a frame its context can predict.
# Usage: python e15_reanchored.py STEPS FRAMES_FROM FRAMES_TO LR [OUT [MODE]]   (from the shipped student)
# MODE "own" (E15, the default) or "next" (E15b): see `reanchor`.
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fewstep.engines.image import ImageEngine
from fewstep.models.checkpoint import read_manifest, save_checkpoint
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import frame_noise, student_stream
from fewstep.trainer import clips, shapes, video_judge
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.video import VideoRecipe, _rollout, _student_times, load_video_net
from fewstep.trainer.video_eval import SEED_BASE, eval_prompts, image_first_frames, load_judge


def cover16(scene: shapes.Scene, size: int) -> np.ndarray:
    k = shapes.SIZE // size
    return shapes.coverage(scene).reshape(size, k, size, k).mean(axis=(1, 3))


def alpha_centroids(frames: np.ndarray, bg: np.ndarray, span: np.ndarray) -> np.ndarray:
    """(F, C, H, W) → (F, 2) centre of the shape's coverage, read off each pixel's place between the
    clip's background and shape colours; NaN where less than one pixel of shape is left."""
    _, _, h, w = frames.shape
    a = np.einsum("fchw,c->fhw", frames - bg[None, :, None, None], span) / (span @ span)
    a = np.clip(a, 0.0, 1.0)
    area = a.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([(a * xs).sum(axis=(1, 2)) / area, (a * ys).sum(axis=(1, 2)) / area], axis=1)
    out[area < 1.0] = np.nan
    return out


def reanchor(
    rollout: np.ndarray, batch: list[clips.Clip], real0: np.ndarray, mode: str = "own"
) -> tuple[np.ndarray, np.ndarray]:
    """(B, F, C, H, W) targets and (B, F) mask: the clip's shape redrawn clean, frame by frame.

    mode "own" (E15): where the rollout's frame has it. mode "next" (E16): one step at the caption's speed
    along the caption's axis on from where the rollout's previous frame has it, bouncing off the walls,
    in the direction the rollout last moved (the caption's at the start)."""
    b, nf, c, h, w = rollout.shape
    out = np.empty_like(rollout)
    ok = np.ones((b, nf), dtype=bool)
    scale = shapes.SIZE / w
    for i, clip in enumerate(batch):
        s = clip.scene
        a0 = cover16(s, w).ravel()
        design = np.stack([np.ones_like(a0), a0], axis=1)
        coef, *_ = np.linalg.lstsq(design, real0[i].reshape(c, -1).T, rcond=None)  # (2, C): bg, fg - bg
        bg, span = coef[0], coef[1]
        offset = alpha_centroids(real0[i][None], bg, span)[0] * scale - np.array([s.cx, s.cy])
        track = alpha_centroids(rollout[i], bg, span) * scale - offset
        lo, hi = s.radius + 0.5, shapes.SIZE - s.radius - 0.5
        speed = clips.SPEEDS[clip.speed]
        vel = np.array(clips.DIRECTIONS[clip.direction], dtype=float) * speed
        axis = 0 if vel[0] else 1
        out[i, 0] = real0[i]
        for f in range(1, nf):
            at = track[f] if mode == "own" else track[f - 1]
            if np.isnan(at).any():
                ok[i, f] = False
                out[i, f] = rollout[i, f]
                continue
            x, y = np.clip(at, lo, hi)
            moved = track[f - 1, axis] - track[f - 2, axis] if f >= 2 else 0.0
            gap_lo, gap_hi = (x, y)[axis] - lo, hi - (x, y)[axis]
            if abs(moved) >= 0.9 * speed:  # a full step: its direction
                vel[axis] = np.sign(moved) * speed
            elif min(gap_lo, gap_hi) <= speed and f >= 2:  # a short step at a wall: a bounce, away from it
                vel[axis] = speed if gap_lo < gap_hi else -speed
            elif abs(moved) >= 0.3 * speed:
                vel[axis] = np.sign(moved) * speed
            if mode != "own":
                x, vel[0] = clips.bounce(x + vel[0], vel[0], lo, hi)
                y, vel[1] = clips.bounce(y + vel[1], vel[1], lo, hi)
            a = cover16(replace(s, cx=float(x), cy=float(y)), w)
            out[i, f] = (coef[0][:, None, None] + coef[1][:, None, None] * a[None]).astype(np.float32)
    return out, ok


def train(r: VideoRecipe, enc: TextEncoder, student, steps: int, f0: int, f1: int, mode: str = "own") -> list[float]:
    g = torch.Generator().manual_seed(r.seed + 15)
    student = student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=r.student_lr, weight_decay=0.0)
    losses = []
    progress = Progress("E15 step", steps, 25)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r.student_lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        frames = f0 + (f1 - f0) * step // max(steps - 1, 1)
        video, batch, caps = clips.batch(r.seed + 7, step + 2 * 10**6, r.student_batch, frames, r.size)
        states, mask = enc.encode(caps)
        real = torch.from_numpy(video)
        context = _rollout(student, states, mask, frames, g, first=real[:, 0])
        target, ok = reanchor(context.numpy(), batch, video[:, 0], mode)
        target, ok = torch.from_numpy(target), torch.from_numpy(ok)
        b, nf = target.shape[:2]
        t = _student_times(b, nf, r.one_step_share, g)
        tb = t[..., None, None, None]
        eps = torch.randn(target.shape, generator=g)
        xt = (1 - tb) * target + tb * eps
        v = student.forward_parallel(context, xt, t, states, mask)
        err = ((xt - tb * v - target) ** 2).mean(dim=(2, 3, 4))[:, 1:]
        w = ok[:, 1:].float()
        loss = (err * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(loss=losses[-1], kept=float(w.mean()))
    return losses


def evaluate(net, enc, ck: Path, r: VideoRecipe, label: str, steps_list=(2, 1)) -> None:
    judge = load_judge(ck / "shapes-video-judge")
    targets, prompts = eval_prompts(r)
    seeds = [SEED_BASE + i for i in range(len(targets))]
    image = ImageEngine(ck / "shapes", enc)
    image.load()
    schedule = FewStepSchedule.from_dict(read_manifest(ck / "shapes-video")["schedule"])
    for steps in steps_list:
        first = image_first_frames(image, prompts, seeds, steps, r.size)
        with torch.inference_mode():
            text = net.eval().text_kv(*enc.encode(prompts))
            v = student_stream(
                net, text, schedule, steps, 256, lambda f, k: frame_noise(seeds, f, k, net.cfg), first=first
            ).numpy()
        s = video_judge.score_streams(judge, v, targets)
        print(f"{label} {steps} steps: 1-16", s.window(0, 16), "241-256", s.window(240, 256), flush=True)
        for a, z in ((16, 64), (64, 128), (128, 192), (192, 240)):
            print(f"   {a}-{z}", s.window(a, z), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    steps, f0, f1, lr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    out = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    mode = sys.argv[6] if len(sys.argv) > 6 else "own"
    ck = Path("checkpoints")
    r = replace(VideoRecipe(), student_lr=lr)
    enc = TextEncoder()
    net = load_video_net(ck / "shapes-video")
    t0 = time.time()
    losses = train(r, enc, net, steps, f0, f1, mode)
    print(f"trained in {time.time() - t0:.0f}s; loss first 20 {np.mean(losses[:20]):.4f} last 20 {np.mean(losses[-20:]):.4f}")
    if out is not None:
        save_checkpoint(out, net.state_dict(), {**read_manifest(ck / "shapes-video"), "name": "e15"})
    evaluate(net, enc, ck, r, "E15" if mode == "own" else "E15b")
