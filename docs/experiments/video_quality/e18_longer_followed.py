# E18: the long-rollouts stage again, on longer rollouts, continuing the shipped student (E15b's weights).
# Same loss and targets as `train_long_rollouts` (retarget.follow), new clips (batch offset 3e6) and a new
# generator, rollouts growing from FRAMES_FROM to FRAMES_TO frames.
# Usage: python e18_longer_followed.py STEPS FRAMES_FROM FRAMES_TO LR [OUT]
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e15_reanchored import evaluate

from fewstep.models.checkpoint import read_manifest, save_checkpoint
from fewstep.models.text import TextEncoder
from fewstep.trainer import clips, retarget
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.video import VideoRecipe, _regression, _rollout, _update, load_video_net


def train(r: VideoRecipe, enc: TextEncoder, student, steps: int, f0: int, f1: int, lr: float) -> list[float]:
    g = torch.Generator().manual_seed(r.seed + 18)
    student = student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    progress = Progress("E18 step", steps, 10)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(25, steps // 10 + 1))
        frames = f0 + (f1 - f0) * step // max(steps - 1, 1)
        video, batch, caps = clips.batch(r.seed + 7, step + 3 * 10**6, r.student_batch, frames, r.size)
        states, mask = enc.encode(caps)
        real = torch.from_numpy(video)
        context = _rollout(student, states, mask, frames, g, first=real[:, 0])
        target, keep = (torch.from_numpy(a) for a in retarget.follow(context.numpy(), batch, video[:, 0]))
        loss = _regression(student, context, target, states, mask, r.one_step_share, g, keep)
        losses.append(_update(opt, student, loss))
        progress.update(loss=losses[-1], kept=float(keep.float().mean()))
    return losses


if __name__ == "__main__":
    torch.set_num_threads(2)
    steps, f0, f1, lr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    out = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    ck = Path("checkpoints")
    r = VideoRecipe()
    enc = TextEncoder()
    net = load_video_net(ck / "shapes-video")
    t0 = time.time()
    losses = train(r, enc, net, steps, f0, f1, lr)
    print(
        f"trained in {time.time() - t0:.0f}s; loss first 10 {np.mean(losses[:10]):.4f} last 10 {np.mean(losses[-10:]):.4f}"
    )
    if out is not None:
        save_checkpoint(out, net.state_dict(), {**read_manifest(ck / "shapes-video"), "name": "e18"})
    evaluate(net, enc, ck, r, "E18", steps_list=(2,))
