# E19: teach the student to restore worn shapes without rolling out. Teacher-forcing passes on real clips
# whose context frames (all but frame 0, the sink, which the image student draws crisp) are worn the way
# long streams wear them: the shape's coverage blended toward a disc of the same area and centre, then
# blurred. Every frame is regressed onto the real (crisp) clip. No rollouts, so a step costs a fraction of
# a self-forcing step. Continues the shipped student.
# Usage: python e19_restore.py STEPS FRAMES LR CLEAN_SHARE MAX_BLUR [OUT]
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e15_reanchored import evaluate

from fewstep.models.checkpoint import read_manifest, save_checkpoint
from fewstep.models.text import TextEncoder
from fewstep.trainer import clips, retarget, shapes
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.video import VideoRecipe, _regression, _update, corrupt, load_video_net


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W) coverage, edges clamped."""
    if sigma <= 0.05:
        return a
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def worn(video: np.ndarray, batch: list[clips.Clip], rng: np.random.Generator, clean: float, max_blur: float):
    """Context clips (B, F, C, H, W): frame 0 as it is; later frames with the shape worn by one level per clip."""
    out = video.copy()
    b, nf, c, h, w = video.shape
    for i, clip in enumerate(batch):
        if rng.random() < clean:
            continue
        level, sigma = rng.uniform(0.0, 1.0), rng.uniform(0.0, max_blur)
        bg, span = retarget.fit_colours(clip.scene, video[i, 0])
        s = clip.scene
        for f, (x, y, _, _) in enumerate(clip.track(nf)):
            if f == 0:
                continue
            at = replace(s, cx=float(x), cy=float(y))
            a = retarget.coverage(at, w)
            disc_r = np.sqrt(shapes.coverage(at).sum() / np.pi)
            d = retarget.coverage(replace(at, shape="circle", radius=float(disc_r)), w)
            a = blur((1 - level) * a + level * d, sigma)
            out[i, f] = bg[:, None, None] + span[:, None, None] * a[None]
    return out


def train(r, enc, student, steps, frames, lr, clean, max_blur) -> list[float]:
    g = torch.Generator().manual_seed(r.seed + 19)
    rng = np.random.default_rng([r.seed, 19])
    student = student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    progress = Progress("E19 step", steps, 25)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        video, batch, caps = clips.batch(r.seed + 7, step + 4 * 10**6, r.student_batch, frames, r.size)
        states, mask = enc.encode(caps)
        context = torch.from_numpy(worn(video, batch, rng, clean, max_blur).astype(np.float32))
        context = corrupt(context, r.context_noise / 2, g)
        context[:, 0] = torch.from_numpy(video[:, 0])
        loss = _regression(student, context, torch.from_numpy(video), states, mask, r.one_step_share, g)
        losses.append(_update(opt, student, loss))
        progress.update(loss=losses[-1])
    return losses


if __name__ == "__main__":
    torch.set_num_threads(2)
    steps, frames, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    clean, max_blur = float(sys.argv[4]), float(sys.argv[5])
    out = Path(sys.argv[6]) if len(sys.argv) > 6 else None
    ck = Path("checkpoints")
    r = VideoRecipe()
    enc = TextEncoder()
    net = load_video_net(ck / "shapes-video")
    t0 = time.time()
    losses = train(r, enc, net, steps, frames, lr, clean, max_blur)
    print(
        f"trained in {time.time() - t0:.0f}s; loss first 25 {np.mean(losses[:25]):.4f} last 25 {np.mean(losses[-25:]):.4f}"
    )
    if out is not None:
        save_checkpoint(out, net.state_dict(), {**read_manifest(ck / "shapes-video"), "name": "e19"})
    evaluate(net, enc, ck, r, "E19", steps_list=(2,))
