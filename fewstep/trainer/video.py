"""`fewstep train video`: the causal video teacher, trained by teacher forcing (issue 5, first stage).

Data are procedural clips (trainer/clips.py), 16×16 by default. At 32×32 a frame is four times as
many tokens, and the attention over a clip grows with the square of that. The self-forcing stage
rolls the student out on its own outputs for every training step, and on 2 CPU cores that
budget decides the size.

**Teacher forcing.** Every frame of a clip gets its own noise level t, drawn from a logit-normal
as for the image teacher. The network predicts each frame's flow velocity (ε − x₀) while seeing
the *clean* earlier frames, exactly as the bounded cache shows them at inference (see
`VideoDenoiser.forward_parallel`). 10 % of prompts are dropped for classifier-free guidance.
The weights kept are an EMA.

Not yet here (issue 5): the few-step causal student, distilled from this teacher and then
trained with self-forcing (rollouts on its own outputs through the cache), the video engine,
and the WebSocket route.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache, TextKV, VideoConfig, VideoDenoiser
from fewstep.trainer import clips
from fewstep.trainer.image import encoder_meta
from fewstep.trainer.progress import Progress
from fewstep.trainer.teacher import Ema, cosine_lr, drop_prompts

STAGES = ("teacher",)
TEACHER_DIR = "shapes-video-teacher"


@dataclass
class VideoRecipe:
    """Sizes and step counts of a run. `quick()` is the seconds-long smoke variant."""

    seed: int = 0
    size: int = 16
    patch: int = 4
    frames: int = 12
    dim: int = 64
    heads: int = 4
    layers: int = 3
    sink: int = 1
    window: int = 8
    teacher_steps: int = 3000
    batch: int = 16
    lr: float = 5e-4
    drop_prob: float = 0.1
    ema_decay: float = 0.999
    sampler_steps: int = 16
    guidance: float = 3.0

    @classmethod
    def quick(cls) -> VideoRecipe:
        return cls(frames=4, dim=32, heads=2, layers=1, window=2, teacher_steps=3, batch=2, sampler_steps=2)

    def config(self) -> VideoConfig:
        return VideoConfig(
            size=self.size,
            patch=self.patch,
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
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
        loss = F.mse_loss(net.forward_parallel(x0, xt, t, states, mask), eps - x0)
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
) -> np.ndarray:
    """Frames (B, frames, C, H, W) in [-1, 1], one at a time: Euler on each frame with CFG, then `write`.

    Two caches, conditional and unconditional, each fed the same finished frames.
    """
    cfg = net.cfg
    b = len(seeds)
    cache, null_cache = KVCache.empty(cfg, b), KVCache.empty(cfg, b)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    grid = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for _ in range(frames):
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


def stage_teacher(r: VideoRecipe, out: Path, encoder: TextEncoder) -> None:
    t0 = time.time()
    net, losses = train_teacher(r, encoder)
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


def run(stages: list[str], out: Path, recipe: VideoRecipe, threads: int) -> None:
    torch.set_num_threads(threads)
    encoder = TextEncoder()
    for stage in stages:
        print(f"[train video] stage {stage}", flush=True)
        t0 = time.time()
        if stage == "teacher":
            stage_teacher(recipe, out, encoder)
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
        print(f"[train video] stage {stage} done in {time.time() - t0:.0f}s", flush=True)
