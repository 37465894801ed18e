"""The step-adaptive image engine: one student artifact serves 1, 2, 3 and 4 NFE.

The timestep lists and the re-noise rule come from the checkpoint's manifest. The engine is a
`StepEngine`: `begin` turns items into trajectories and `advance` runs one network evaluation
for any mix of them, each at its own step, so the step-level scheduler can let items join
and leave a running batch at step boundaries. Every noise draw is derived from (seed, step),
so an item's image is the same whatever else is in its batch (the determinism contract).

With a teacher loaded beside the student, an item may ask for the diversity-distillation
hybrid: the teacher (with its own classic CFG) takes the first interval of the item's timestep
list, the student the rest, handed off as the student's manifest says (`sampling.Handoff`: one
teacher step re-noised, or `teacher_steps` steps along the teacher's own ODE). `steps` keeps its
meaning: it picks the same student timesteps as without the hybrid, so a hybrid item costs
2 × `teacher_steps` teacher NFE + (steps - 1) student NFE.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from fewstep.engines.backends import backend
from fewstep.engines.base import (
    ImageItem,
    ImageResult,
    Outcome,
    Slot,
    StopCheck,
    partial_index,
    run_to_completion,
)
from fewstep.engines.pixels import decode_png
from fewstep.engines.specs import ImageSpec
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, InvalidRequest
from fewstep.models.checkpoint import read_manifest
from fewstep.models.sampling import (
    Handoff,
    HybridTeacher,
    advance,
    from_pixels,
    start_edit,
    start_trajectory,
    to_pixels,
)
from fewstep.models.schedules import FewStepSchedule, TeacherSampler
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser

log = logging.getLogger("fewstep.engines")


class ImageEngine:
    """Runs the few-step student of one registry version on one backend."""

    def __init__(
        self,
        folder: Path,
        encoder: TextEncoder,
        backend: str = "torch",
        precision: str = "fp32",
        version: str | None = None,
        teacher_folder: Path | None = None,
        trt_cache: Path | None = None,
    ) -> None:
        """`teacher_folder`: the exact teacher the student was distilled from, for hybrid items; `trt_cache`:
        where the tensorrt backend keeps its plans (the `trt_cache` setting)."""
        self.folder = folder
        self.trt_cache = trt_cache
        self.teacher_folder = teacher_folder
        self.encoder = encoder
        self.backend = backend
        self.precision = precision
        manifest = read_manifest(folder)
        if manifest.get("kind") != "image":
            raise CheckpointError(f"{folder}: kind {manifest.get('kind')!r} is not an image student")
        self.manifest = manifest
        self.handoff = Handoff.from_manifest(manifest)
        self.spec = ImageSpec.from_manifest(
            manifest,
            version or str(manifest.get("version", "1")),
            backend,
            precision,
            hybrid=teacher_folder is not None,
        )
        self.schedule = FewStepSchedule.from_dict(manifest["schedule"])
        self.shape = (int(manifest["architecture"]["config"].get("in_channels", 3)), self.spec.height, self.spec.width)
        self._net: Denoiser | None = None
        self._teacher: HybridTeacher | None = None
        # Workers call `advance` from several threads at once (an interactive-only worker beside a general
        # one): torch modules and ONNX Runtime sessions run concurrently, a TensorRT execution context
        # does not, so only that backend's calls are serialised.
        self._lock: AbstractContextManager[object] = threading.Lock() if backend == "tensorrt" else nullcontext()

    def load(self) -> None:
        self._net = backend(self.backend, self.trt_cache).image(self.folder, self.manifest, self.precision)
        if self.teacher_folder is not None:
            try:
                self._teacher = self._load_teacher(self.teacher_folder)
            except CheckpointError as e:
                # The student serves on; only hybrid requests are refused (with this reason).
                self.spec = dataclasses.replace(self.spec, hybrid=False, hybrid_reason=str(e))

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
        null_states, null_mask = self.encoder.encode([""])
        net = backend(self.backend, self.trt_cache).image(folder, manifest, self.precision)
        return HybridTeacher(net, sampler.guidance, null_states, null_mask, self.handoff)

    def warmup(self) -> None:
        items = [ImageItem("warm-up", seed=0, steps=n) for n in self.spec.steps]
        if self.spec.hybrid:
            items += [ImageItem("warm-up", seed=0, steps=n, hybrid=True) for n in self.spec.steps if n > 1]
        for r in self.run(items):
            if isinstance(r, FewstepError):
                raise CheckpointError(f"{self.folder}: warm-up failed: {r}")

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        """`run_to_completion` on this engine: one outcome per item."""
        return run_to_completion(self, items, stop)

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        if self._net is None:
            raise RuntimeError("ImageEngine.begin called before load()")
        slots = [Slot(item=it) for it in items]
        good: list[Slot] = []
        for slot in slots:
            try:
                self.spec.validate(slot.item)
                good.append(slot)
            except FewstepError as e:
                slot.outcome = e
        if good:
            states, mask = self.encoder.encode([s.item.prompt for s in good])
            for i, slot in enumerate(good):
                it = slot.item
                if it.image is None:
                    slot.state = start_trajectory(
                        self.schedule, it.steps, it.seed, states[i], mask[i], self.shape, it.hybrid, self.handoff
                    )
                    continue
                try:
                    image = from_pixels(decode_png(it.image, self.spec.width, self.spec.height))
                except (ValueError, OSError) as e:  # a starting image that is not the item's PNG
                    slot.outcome = InvalidRequest("image", f"the starting image does not decode: {e}")
                    continue
                strength = 1.0 if it.strength is None else it.strength
                slot.state = start_edit(self.schedule, it.steps, strength, it.seed, states[i], mask[i], image)
        return slots

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live:
            return
        assert self._net is not None
        failed: Exception | None = None
        with self._lock:
            try:
                advance(self._net, self.schedule, [s.state for s in live], self._teacher)
            except Exception as e:  # an engine fault fails items, never the process
                failed = e
        if failed is not None:
            log.warning(
                "%s:%s step failed for %d items: %s: %s",
                self.spec.model,
                self.spec.version,
                len(live),
                type(failed).__name__,
                failed,
            )
            if len(live) > 1:
                # A failed call changed no state: run each item alone, so that only an item whose own input
                # breaks the network fails, never its neighbours (other clients' requests).
                for s in live:
                    self.advance([s])
                return
            live[0].outcome = GenerationFailed(f"generation failed: {type(failed).__name__}")
            return
        for s in live:
            s.steps_run += 1
            x0 = s.state.x0
            if x0 is None:
                k = partial_index(self.spec.run_steps(s.item), s.item.partials, s.steps_run)
                if k is not None:
                    s.partial = (k, to_pixels(s.state.estimate.nan_to_num(0.0)[None])[0])
                continue
            if not torch.isfinite(x0).all():
                s.outcome = GenerationFailed("generation failed: non-finite output")
            else:
                it = s.item
                px = to_pixels(x0[None])[0]
                s.outcome = ImageResult(px, it.seed, it.steps, self.spec.nfe(it), self.spec.version)
            s.state = None  # free the tensors as soon as the item is done

    def close(self) -> None:
        self._net = None
        self._teacher = None
