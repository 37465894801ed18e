"""The step-adaptive image engine: one student artifact serves 1, 2, 3 and 4 NFE.

The timestep lists and the re-noise rule come from the checkpoint's manifest. A batch may mix
step counts: items leave the running batch as they finish (`student_sample_mixed`). Every
noise draw is derived from (seed, step), so an item's image is the same whatever else is in
its batch (DESIGN.md §3).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.engines.backends import load_backend
from fewstep.engines.base import EngineInfo, ImageItem, ImageResult, Outcome
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, InvalidRequest, limit_error
from fewstep.models.checkpoint import read_manifest
from fewstep.models.sampling import student_sample_mixed
from fewstep.models.schedules import MAX_SEED, FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser


def to_pixels(x0: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounding half up."""
    return ((x0.clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ImageEngine:
    """Runs the few-step student of one registry version on one backend."""

    def __init__(
        self,
        folder: Path,
        encoder: TextEncoder,
        backend: str = "torch",
        precision: str = "fp32",
        version: str | None = None,
    ) -> None:
        self.folder = folder
        self.encoder = encoder
        self.backend = backend
        self.precision = precision
        manifest = read_manifest(folder)
        if manifest.get("kind") != "image":
            raise CheckpointError(f"{folder}: kind {manifest.get('kind')!r} is not an image student")
        try:
            self.schedule = FewStepSchedule.from_dict(manifest["schedule"])
            h, w = (int(v) for v in manifest["native_size"].split("x"))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{folder}: manifest has no valid schedule or native_size ({e})") from e
        self.manifest = manifest
        self.shape = (int(manifest["architecture"]["config"].get("in_channels", 3)), h, w)
        self.info = EngineInfo(
            model=manifest["name"],
            version=version or str(manifest.get("version", "1")),
            kind="image",
            steps=self.schedule.steps,
            default_steps=self.schedule.default_steps,
            size=manifest["native_size"],
            backend=backend,
            precision=precision,
        )
        self._net: Denoiser | None = None
        self._lock = threading.Lock()
        self._batches = 0
        self._last_error: str | None = None

    def load(self) -> None:
        self._net = load_backend(self.backend, self.folder, self.manifest, self.precision)

    def warmup(self) -> None:
        results = self.run([ImageItem("warm-up", seed=0, steps=n) for n in self.schedule.steps])
        for r in results:
            if isinstance(r, FewstepError):
                raise CheckpointError(f"{self.folder}: warm-up failed: {r}")
            if not np.isfinite(r.pixels).all():
                raise CheckpointError(f"{self.folder}: warm-up produced non-finite output")

    def validate(self, item: ImageItem) -> None:
        """Raise InvalidRequest if the item cannot be served by this engine."""
        self.schedule.timesteps_for(item.steps)
        if not 0 <= item.seed <= MAX_SEED:
            raise limit_error("seed", f"between 0 and {MAX_SEED}", item.seed)
        if item.hybrid:
            raise InvalidRequest("hybrid", "`hybrid` is not available for this model yet. Given: true")

    def run(self, items: list[ImageItem]) -> list[Outcome]:
        if self._net is None:
            raise RuntimeError("ImageEngine.run called before load()")
        outcomes: list[Outcome | None] = [None] * len(items)
        good: list[int] = []
        for i, item in enumerate(items):
            try:
                self.validate(item)
                good.append(i)
            except FewstepError as e:
                outcomes[i] = e
        if good:
            with self._lock:
                try:
                    pixels = self._generate([items[i] for i in good])
                except Exception as e:  # an engine fault fails this batch, never the process
                    self._last_error = f"{type(e).__name__}: {e}"
                    for i in good:
                        outcomes[i] = GenerationFailed(f"generation failed: {type(e).__name__}")
                else:
                    for j, i in enumerate(good):
                        it = items[i]
                        outcomes[i] = ImageResult(pixels=pixels[j], seed=it.seed, steps=it.steps, nfe=it.steps)
                self._batches += 1
        return [o for o in outcomes if o is not None]

    def _generate(self, items: list[ImageItem]) -> np.ndarray:
        assert self._net is not None
        states, mask = self.encoder.encode([it.prompt for it in items])
        x0 = student_sample_mixed(
            self._net, self.schedule, [it.steps for it in items], states, mask, [it.seed for it in items], self.shape
        )
        if not torch.isfinite(x0).all():
            raise FloatingPointError("non-finite output")
        return to_pixels(x0)

    def health(self) -> dict[str, Any]:
        return {
            "loaded": self._net is not None,
            "batches": self._batches,
            "last_error": self._last_error,
            "checked_at": time.time(),
        }

    def close(self) -> None:
        self._net = None
