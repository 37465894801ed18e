# E21: the long-rollouts stage with wear injected into the rollouts. Streams lose a square's corners or a
# cross's arms at a random frame and never get them back (per stream, /tmp analysis in the README), but a
# 16-48 frame rollout rarely meets such a frame, so the stage rarely teaches restoring one. Here, in half
# the rollouts, one frame (at a random place) is replaced by a worn copy of itself: the clip's shape redrawn
# where the rollout has it, blended toward a disc of the same area and blurred (E19's wear), and the student
# continues from it on its own. Every frame is regressed onto `retarget.follow`'s crisp targets, as in the
# stage. Continues the shipped student. Judged on 128 held-out streams (the model card uses 32).
# Usage: python e21_injected_wear.py STEPS FRAMES_FROM FRAMES_TO LR SHARE [OUT]
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e19_restore import blur

from fewstep.engines.image import ImageEngine
from fewstep.models.checkpoint import read_manifest, save_checkpoint
from fewstep.models.schedules import FewStepSchedule, default_student_schedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache, frame_noise, student_stream
from fewstep.trainer import clips, retarget, shapes, video_judge
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.video import VideoRecipe, _regression, _update, load_video_net
from fewstep.trainer.video_eval import SEED_BASE, eval_prompts, image_first_frames, load_judge


def worn_copy(frame: np.ndarray, clip: clips.Clip, first: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    s = clip.scene
    w = frame.shape[-1]
    bg, span = retarget.fit_colours(s, first)
    scale = shapes.SIZE / w
    offset = retarget.centres(first[None], bg, span)[0] * scale - np.array([s.cx, s.cy])
    at = retarget.centres(frame[None], bg, span)[0] * scale - offset
    if np.isnan(at).any():
        return None
    lo, hi = s.radius + 0.5, shapes.SIZE - s.radius - 0.5
    x, y = np.clip(at, lo, hi)
    here = replace(s, cx=float(x), cy=float(y))
    a = retarget.coverage(here, w)
    disc = replace(here, shape="circle", radius=float(np.sqrt(shapes.coverage(here).sum() / np.pi)))
    level = rng.uniform(0.3, 1.0)
    a = blur((1 - level) * a + level * retarget.coverage(disc, w), rng.uniform(0.0, 0.6))
    return (bg[:, None, None] + span[:, None, None] * a[None]).astype(np.float32)


@torch.no_grad()
def rollout(student, states, mask, frames, g, first, batch, rng, share) -> torch.Tensor:
    """`trainer.video._rollout` with one frame of a `share` of the streams swapped for a worn copy."""
    schedule = default_student_schedule()
    steps = int(torch.randint(1, 5, (1,), generator=g))
    ts = schedule.timesteps_for(steps)
    b = states.shape[0]
    shape = (b, student.cfg.channels, student.cfg.size, student.cfg.size)
    inject = [int(rng.integers(2, max(3, frames - 4))) if rng.random() < share else -1 for _ in range(b)]
    student.eval()
    text = student.text_kv(states, mask)
    cache = KVCache.empty(student.cfg, b)
    cfg = student.cfg
    cache.store(*student.keys_values(first, text, cache), first, sink=cfg.sink, window=cfg.window)
    out = [first]
    for f in range(1, frames):
        x = torch.randn(shape, generator=g)
        x0 = x
        for k, t in enumerate(ts):
            tt = torch.full((b,), t)
            v = student.denoise(x, tt, text, cache)
            x0 = schedule.to_x0(v, x, tt)
            if k + 1 < len(ts):
                x = schedule.next_state(x0, v, x, tt, torch.full((b,), ts[k + 1]), torch.randn(shape, generator=g))
        frame = x0.clamp(-1, 1)
        for i in range(b):
            if inject[i] == f:
                worn = worn_copy(frame[i].numpy(), batch[i], first[i].numpy(), rng)
                if worn is not None:
                    frame[i] = torch.from_numpy(worn)
        cache.store(*student.keys_values(frame, text, cache), frame, sink=cfg.sink, window=cfg.window)
        out.append(frame)
    student.train()
    return torch.stack(out, dim=1).clone()


def train(r, enc, student, steps, f0, f1, lr, share) -> list[float]:
    g = torch.Generator().manual_seed(r.seed + 21)
    rng = np.random.default_rng([r.seed, 21])
    student = student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    progress = Progress("E21 step", steps, 10)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        frames = f0 + (f1 - f0) * step // max(steps - 1, 1)
        video, batch, caps = clips.batch(r.seed + 7, step + 5 * 10**6, r.student_batch, frames, r.size)
        states, mask = enc.encode(caps)
        real = torch.from_numpy(video)
        context = rollout(student, states, mask, frames, g, real[:, 0], batch, rng, share)
        target, keep = (torch.from_numpy(a) for a in retarget.follow(context.numpy(), batch, video[:, 0]))
        loss = _regression(student, context, target, states, mask, r.one_step_share, g, keep)
        losses.append(_update(opt, student, loss))
        progress.update(loss=losses[-1])
    return losses


def judge_many(net, enc, ck: Path, n: int, label: str) -> None:
    """128 held-out streams of 256 frames at 2 steps: joint by window, and frames 241-256 by shape."""
    r = VideoRecipe(eval_streams=n)
    targets, prompts = eval_prompts(r)
    seeds = [SEED_BASE + i for i in range(len(prompts))]
    image = ImageEngine(ck / "shapes", enc)
    image.load()
    first = image_first_frames(image, prompts, seeds, 2, 16)
    sched = FewStepSchedule.from_dict(read_manifest(ck / "shapes-video")["schedule"])
    with torch.inference_mode():
        text = net.eval().text_kv(*enc.encode(prompts))
        v = student_stream(net, text, sched, 2, 256, lambda f, k: frame_noise(seeds, f, k, net.cfg), first=first)
    s = video_judge.score_streams(load_judge(ck / "shapes-video-judge"), v.numpy(), targets)
    windows = ((0, 16), (16, 64), (64, 128), (128, 192), (192, 240), (240, 256))
    print(label, " ".join(f"{a + 1}-{z} {s.window(a, z)['joint']:.3f}" for a, z in windows), flush=True)
    print(label, "motion 1-16", s.window(0, 16)["motion"], "241-256", s.window(240, 256)["motion"])
    late = (s.shape & s.colour)[:, 240:].mean(1)
    for shp in shapes.SHAPES:
        m = np.array([t.scene.shape == shp for t in targets])
        print(f"  {shp:8s} n={m.sum():3d} frames 241-256 joint {late[m].mean():.3f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    steps, f0, f1, lr, share = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
        float(sys.argv[5]),
    )
    out = Path(sys.argv[6]) if len(sys.argv) > 6 else None
    ck = Path("checkpoints")
    enc = TextEncoder()
    net = load_video_net(ck / "shapes-video")
    if steps == 0:
        judge_many(net, enc, ck, 128, "shipped")
        sys.exit()
    t0 = time.time()
    losses = train(VideoRecipe(), enc, net, steps, f0, f1, lr, share)
    print(
        f"trained in {time.time() - t0:.0f}s; loss first 10 {np.mean(losses[:10]):.4f} last 10 {np.mean(losses[-10:]):.4f}"
    )
    if out is not None:
        save_checkpoint(out, net.state_dict(), {**read_manifest(ck / "shapes-video"), "name": "e21"})
    judge_many(net, enc, ck, 128, "E21")
