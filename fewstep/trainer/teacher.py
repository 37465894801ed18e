"""Teacher training: text-conditioned flow matching on the procedural shapes.

Flow matching with logit-normal timesteps (as in minRF / SD3), 10% prompt dropout so that
the teacher supports classifier-free guidance, and an EMA of the weights that is what gets
saved and sampled.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fewstep.evaluation import shapes
from fewstep.models.unet import build_unet, denoise
from fewstep.trainer.captions import CaptionBank
from fewstep.trainer.progress import Progress


class Ema:
    """Exponential moving average of a module's parameters, with a warm-up on the decay."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).eval()
        self.decay = decay
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), module.buffers(), strict=True):
            mine.copy_(theirs)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + torch.cos(torch.tensor(p * torch.pi)).item())


def drop_prompts(
    states: torch.Tensor,
    mask: torch.Tensor,
    null_states: torch.Tensor,
    null_mask: torch.Tensor,
    p: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each prompt by the empty one with probability `p`: what classifier-free guidance trains on."""
    drop = torch.rand(states.shape[0], generator=g) < p
    return (
        torch.where(drop[:, None, None], null_states, states),
        torch.where(drop[:, None], null_mask, mask),
    )


def train_teacher(
    config: dict,
    bank: CaptionBank,
    seed: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    drop_prob: float = 0.1,
    ema_decay: float = 0.999,
    log_every: int = 50,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a teacher UNet; returns its EMA copy and the per-step losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = build_unet(config).train()
    ema = Ema(unet, ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    losses: list[float] = []
    progress = Progress("teacher step", steps, log_every)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(200, steps // 10 + 1))
        x0_np, _, caps = shapes.batch(seed, step, batch_size)
        x0 = torch.from_numpy(x0_np)
        states, mask = bank.lookup(caps)
        states, mask = drop_prompts(states, mask, bank.null_states, bank.null_mask, drop_prob, g)
        t = torch.sigmoid(torch.randn(batch_size, generator=g))
        z = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z
        loss = F.mse_loss(denoise(unet, xt, t, states, mask), z - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        losses.append(loss.item())
        progress.update(loss=losses[-1])
    return ema.module, losses
