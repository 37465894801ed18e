# E16: self-forcing at the depths the streams are served at, for the cost of short rollouts. A pool of
# streams lives across training steps: every step continues each of them by ADVANCE frames through the
# student's cache, and trains on those frames alone (seen after the sink and a lead-in of
# layers × window earlier frames, so the parallel pass sees what frame-by-frame inference saw). The pool
# restarts from new clips' first frames every DEPTH frames, so training covers frames 1 to DEPTH evenly;
# GROUPS pools take turns, at staggered depths.
# Targets follow the rollout's own track: one step of the caption's motion on from where the rollout's
# previous frame has the shape (E15's `reanchor`, mode "next").
# Usage: python e16_deep.py STEPS DEPTH ADVANCE LR [OUT]   (from the shipped student)
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e15_reanchored import evaluate, reanchor  # noqa: E402

GROUPS = 4

from fewstep.models.checkpoint import read_manifest, save_checkpoint  # noqa: E402
from fewstep.models.schedules import default_student_schedule  # noqa: E402
from fewstep.models.text import TextEncoder  # noqa: E402
from fewstep.models.video import KVCache  # noqa: E402
from fewstep.trainer import clips  # noqa: E402
from fewstep.trainer.progress import Progress  # noqa: E402
from fewstep.trainer.teacher import cosine_lr  # noqa: E402
from fewstep.trainer.video import VideoRecipe, _student_times, load_video_net  # noqa: E402


class Pool:
    """`n` streams in lockstep: their clips, first frames, latest frames and the student's cache."""

    def __init__(self, r: VideoRecipe, enc: TextEncoder, n: int, keep: int, cycle: int, g: torch.Generator):
        self.r, self.enc, self.n, self.keep, self.g = r, enc, n, keep, g
        video, self.clips, caps = clips.batch(r.seed + 7, cycle + 3 * 10**6, n, 1, r.size)
        self.first = torch.from_numpy(video[:, 0])
        self.real0 = video[:, 0]
        self.states, self.mask = enc.encode(caps)
        self.recent = self.first[:, None]  # (n, ≤ keep + 1, C, H, W): frame 0, then the latest frames
        self.depth = 0
        self.steps = int(torch.randint(1, 5, (1,), generator=g))

    @torch.no_grad()
    def advance(self, net, frames: int) -> torch.Tensor:
        """Continue every stream by `frames`; returns the new frames (n, frames, C, H, W)."""
        net.eval()
        cfg = net.cfg
        schedule = default_student_schedule()
        ts = schedule.timesteps_for(self.steps)
        text = net.text_kv(self.states, self.mask)
        # The cache is rebuilt from the kept frames with the weights as they are now: keys and values
        # written by older weights drove the pool's streams apart from what the student would draw.
        self.cache = KVCache.empty(cfg, self.n)
        for f in range(self.recent.shape[1]):
            frame = self.recent[:, f]
            self.cache.store(*net.keys_values(frame, text, self.cache), frame, cfg.sink, cfg.window)
        shape = (self.n, cfg.channels, cfg.size, cfg.size)
        out = []
        for _ in range(frames):
            x = torch.randn(shape, generator=self.g)
            for k, t in enumerate(ts):
                tt = torch.full((self.n,), t)
                v = net.denoise(x, tt, text, self.cache)
                x0 = schedule.to_x0(v, x, tt)
                if k + 1 < len(ts):
                    nxt = torch.full((self.n,), ts[k + 1])
                    x = schedule.next_state(x0, v, x, tt, nxt, torch.randn(shape, generator=self.g))
            frame = x0.clamp(-1, 1)
            self.cache.store(*net.keys_values(frame, text, self.cache), frame, cfg.sink, cfg.window)
            out.append(frame)
        net.train()
        new = torch.stack(out, dim=1)
        self.depth += frames
        self.last = new
        return new


def train(r: VideoRecipe, enc: TextEncoder, student, steps: int, depth: int, advance: int) -> list[float]:
    g = torch.Generator().manual_seed(r.seed + 16)
    cfg = student.cfg
    lead = cfg.layers * cfg.window
    student = student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=r.student_lr, weight_decay=0.0)
    losses = []
    progress = Progress("E16 step", steps, int(os.environ.get("E16_LOG", "25")))
    # GROUPS pools take turns, each starting at another depth, so that consecutive steps see other clips
    # at other depths (one pool of 16 clips for 30 steps in a row wrecked the student's long streams).
    pools = [Pool(r, enc, r.student_batch, lead, g_, g) for g_ in range(GROUPS)]
    cycle = GROUPS
    for k, pool in enumerate(pools):
        if k:
            pool.advance(student, lead + k * depth // GROUPS)
            pool.recent = torch.cat([pool.first[:, None], pool.last[:, -lead:]], dim=1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r.student_lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        k = step % GROUPS
        if pools[k].depth + advance > depth:
            pools[k] = Pool(r, enc, r.student_batch, lead, cycle, g)
            cycle += 1
        pool = pools[k]
        n_new = advance if pool.depth else advance + lead  # a new pool first rolls out its lead-in
        new = pool.advance(student, n_new)
        recent = torch.cat([pool.recent, new], dim=1)  # frame 0, then the latest frames
        context = recent  # frame 0 (the sink), the lead-in (none in a new pool), the new frames
        pool.recent = torch.cat([pool.first[:, None], recent[:, 1:][:, -lead:]], dim=1)
        target, ok = reanchor(context.numpy(), pool.clips, pool.real0, mode="next")
        target, ok = torch.from_numpy(target), torch.from_numpy(ok)
        b, nf = target.shape[:2]
        train_from = nf - n_new  # the lead-in frames are context only
        t = _student_times(b, nf, r.one_step_share, g)
        tb = t[..., None, None, None]
        eps = torch.randn(target.shape, generator=g)
        xt = (1 - tb) * target + tb * eps
        v = student.forward_parallel(context, xt, t, pool.states, pool.mask)
        err = ((xt - tb * v - target) ** 2).mean(dim=(2, 3, 4))[:, train_from:]
        w = ok[:, train_from:].float()
        loss = (err * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(loss=losses[-1], depth=float(pool.depth), kept=float(w.mean()))
    return losses


if __name__ == "__main__":
    torch.set_num_threads(2)
    steps, depth, advance, lr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    out = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    ck = Path("checkpoints")
    r = replace(VideoRecipe(), student_lr=lr)
    enc = TextEncoder()
    net = load_video_net(ck / "shapes-video")
    t0 = time.time()
    losses = train(r, enc, net, steps, depth, advance)
    print(f"trained in {time.time() - t0:.0f}s; loss first 20 {np.mean(losses[:20]):.4f} last 20 {np.mean(losses[-20:]):.4f}")
    if out is not None:
        save_checkpoint(out, net.state_dict(), {**read_manifest(ck / "shapes-video"), "name": "e16"})
    evaluate(net, enc, ck, r, "E16")
