"""Training the attribute classifier (`evaluation.classifier`), the judge of generated images.

It is trained on procedural images with mild noise and blur, so that it judges generations by what
they show rather than by pixel-perfect edges.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.evaluation import shapes
from fewstep.evaluation.classifier import AttributeClassifier, predict
from fewstep.trainer.progress import Progress


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise and a random box blur on half the batch: generations are never pixel-perfect."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=g)
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        k = torch.ones(3, 1, 3, 3) / 9.0
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x.clamp(-1.5, 1.5)


Batches = Callable[[int, int], tuple[np.ndarray, list[shapes.Scene]]]
"""(step, batch size) → images in [-1, 1] and the scenes they show."""


def _images(seed: int) -> Batches:
    def batch(step: int, n: int) -> tuple[np.ndarray, list[shapes.Scene]]:
        x, scenes, _ = shapes.batch(seed + 7919, step, n)
        return x, scenes

    return batch


def train_classifier(
    seed: int,
    steps: int,
    batch_size: int = 128,
    log_every: int = 100,
    data: Batches | None = None,
    label: str = "classifier step",
) -> AttributeClassifier:
    """Train on fresh procedural batches (default: still images; the video judge passes clip frames)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    progress = Progress(label, steps, log_every)
    data = data or _images(seed)
    for step in range(steps):
        x, scenes = data(step, batch_size)
        ys, yc = (torch.from_numpy(a) for a in shapes.labels(scenes))
        ls, lc = model(_augment(torch.from_numpy(x), g))
        loss = F.cross_entropy(ls, ys) + F.cross_entropy(lc, yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.update(loss=loss.item())
    return model.eval()


def real_accuracy(model: AttributeClassifier, seed: int, n: int = 2000) -> dict[str, float]:
    """Shape, colour and joint accuracy on fresh real images from a held-out seed stream."""
    x, scenes, _ = shapes.batch(seed + 104729, 0, n)
    ys, yc = shapes.labels(scenes)
    s, c, _ = predict(model, x)
    return {
        "shape": float((s == ys).mean()),
        "colour": float((c == yc).mean()),
        "joint": float(((s == ys) & (c == yc)).mean()),
        "n": n,
    }
