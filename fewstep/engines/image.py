"""The step-adaptive image engine: one student artifact serves 1, 2, 3 and 4 NFE.

The timestep lists and the re-noise rule come from the checkpoint's manifest. The engine is a
`Stepper`: `begin` turns items into trajectories and `advance` runs one network evaluation
for any mix of them, each at its own step, so the step-level scheduler can let items join
and leave a running batch at step boundaries. Every noise draw is derived from (seed, step),
so an item's image is the same whatever else is in its batch (DESIGN.md §3).

With a teacher loaded beside the student, an item may ask for the diversity-distillation
hybrid: the teacher (with its own classic CFG) takes the first step of the item's timestep
list, the student the rest. `steps` keeps its meaning: it picks the same timestep list as
without the hybrid, so a hybrid item costs 2 teacher NFE + (steps - 1) student NFE.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.engines.backends import load_backend
from fewstep.engines.base import EngineInfo, ImageItem, ImageResult, Outcome, Slot, StopCheck, run_to_completion
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, InvalidRequest, limit_error
from fewstep.models.checkpoint import read_manifest
from fewstep.models.sampling import HybridTeacher, advance, start_trajectory, to_pixels
from fewstep.models.schedules import MAX_SEED, FewStepSchedule, TeacherSampler
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser


class ImageEngine:
    """Runs the few-step student of one registry version on one backend."""

    def __init__(
        self,
        folder: Path,
        encoder: TextEncoder | None,
        backend: str = "torch",
        precision: str = "fp32",
        version: str | None = None,
        teacher_folder: Path | None = None,
    ) -> None:
        self.folder = folder
        self.teacher_folder = teacher_folder
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
            extra={"hybrid": teacher_folder is not None},
        )
        self._net: Denoiser | None = None
        self._teacher: HybridTeacher | None = None
        self.teacher_error: str | None = None
        self._lock = threading.Lock()
        self._steps = 0
        self._last_error: str | None = None

    def load(self) -> None:
        if self.encoder is None:
            raise CheckpointError(f"{self.folder}: an engine that runs needs a text encoder")
        self._net = load_backend(self.backend, self.folder, self.manifest, self.precision)
        if self.teacher_folder is not None:
            try:
                self._teacher = self._load_teacher(self.teacher_folder)
            except CheckpointError as e:
                # The student serves on; only hybrid requests are refused (with this reason).
                self.teacher_error = str(e)
                self.teacher_folder = None
                self.info.extra["hybrid"] = False

    def _load_teacher(self, folder: Path) -> HybridTeacher:
        manifest = read_manifest(folder)
        if manifest.get("kind") != "image-teacher":
            raise CheckpointError(f"{folder}: kind {manifest.get('kind')!r} is not an image teacher")
        if manifest["architecture"]["config"].get("in_channels") != self.shape[0]:
            raise CheckpointError(f"{folder}: teacher and student latents differ in channels")
        try:
            sampler = TeacherSampler.from_dict(manifest["sampler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{folder}: manifest has no valid sampler ({e})") from e
        assert self.encoder is not None
        null_states, null_mask = self.encoder.encode([""])
        net = load_backend(self.backend, folder, manifest, self.precision)
        return HybridTeacher(net=net, guidance=sampler.guidance, null_states=null_states, null_mask=null_mask)

    @property
    def hybrid_available(self) -> bool:
        return self.teacher_folder is not None

    def nfe(self, item: ImageItem) -> int:
        """Network evaluations an item costs: its steps, plus one for the teacher's CFG if hybrid."""
        return item.steps + (HybridTeacher.NFE_PER_STEP - 1 if item.hybrid else 0)

    def warmup(self) -> None:
        items = [ImageItem("warm-up", seed=0, steps=n) for n in self.schedule.steps]
        if self.hybrid_available:
            items += [ImageItem("warm-up", seed=0, steps=n, hybrid=True) for n in self.schedule.steps if n > 1]
        results = self.run(items)
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
            if not self.hybrid_available:
                why = f" ({self.teacher_error})" if self.teacher_error else ""
                raise InvalidRequest(
                    "hybrid", f"`hybrid` needs the model's teacher, which is not loaded{why}. Given: true"
                )
            if item.steps < 2:
                raise limit_error(
                    "steps", f"between 2 and {max(self.schedule.steps)} when `hybrid` is true", item.steps
                )

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        return run_to_completion(self, items, stop)

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        if self._net is None or self.encoder is None:
            raise RuntimeError("ImageEngine.begin called before load()")
        slots = [Slot(item=it) for it in items]
        good: list[Slot] = []
        for slot in slots:
            try:
                self.validate(slot.item)
                good.append(slot)
            except FewstepError as e:
                slot.outcome = e
        if good:
            states, mask = self.encoder.encode([s.item.prompt for s in good])
            for i, slot in enumerate(good):
                it = slot.item
                slot.state = start_trajectory(
                    self.schedule, it.steps, it.seed, states[i], mask[i], self.shape, it.hybrid
                )
        return slots

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live:
            return
        assert self._net is not None
        with self._lock:
            try:
                advance(self._net, self.schedule, [s.state for s in live], self._teacher)
            except Exception as e:  # an engine fault fails these items, never the process
                self._last_error = f"{type(e).__name__}: {e}"
                for s in live:
                    s.outcome = GenerationFailed(f"generation failed: {type(e).__name__}")
                return
            finally:
                self._steps += 1
        for s in live:
            s.steps_run += 1
            x0 = s.state.x0
            if x0 is None:
                continue
            if not torch.isfinite(x0).all():
                s.outcome = GenerationFailed("generation failed: non-finite output")
            else:
                it = s.item
                px = to_pixels(x0[None])[0]
                s.outcome = ImageResult(px, it.seed, it.steps, self.nfe(it), self.info.version)
            s.state = None  # free the tensors as soon as the item is done

    def health(self) -> dict[str, Any]:
        return {
            "loaded": self._net is not None,
            "steps": self._steps,
            "last_error": self._last_error,
            "checked_at": time.time(),
        }

    def close(self) -> None:
        self._net = None
        self._teacher = None
