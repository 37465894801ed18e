"""The causal video teacher: flow matching with teacher forcing, and its multi-step CFG sampler.

Every frame of a clip gets its own noise level t, drawn from a logit-normal as for the image teacher.
The network predicts each frame's flow velocity (ε − x₀) while seeing the earlier frames as the bounded
cache shows them at inference (`VideoDenoiser.forward_parallel`): teacher forcing. The context frames
carry Gaussian noise of a per-clip σ up to `context_noise`; without it the teacher copied its own small
errors forward frame after frame and shapes faded out within ~10 frames. 10 % of prompts are dropped
for classifier-free guidance; the weights kept are an EMA. Frame 0 is given at inference (the image
student draws it), so only frames 1 on are trained.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.evaluation import clips
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser
from fewstep.models.video_cache import KVCache, TextKV
from fewstep.trainer.progress import Progress
from fewstep.trainer.stages import VideoRecipe
from fewstep.trainer.teacher import Ema, cosine_lr, drop_prompts


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
        losses.append(optimise(opt, net, F.mse_loss(v[:, 1:], (eps - x0)[:, 1:])))
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


def optimise(opt: torch.optim.Optimizer, net: torch.nn.Module, loss: torch.Tensor) -> float:
    """One optimiser step on `loss` with the gradient norm clipped to 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.item()
