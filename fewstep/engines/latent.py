"""The latent engine: users' diffusers students (SD 1.x/2.x and SDXL UNet pipelines), step by step.

A `StepEngine` over an imported pipeline (`models.importing`): items at different steps, step counts, sizes
and guidance share a running batch. Each item is a `Walk` of `models.latent_sampler` (its own family
scheduler, its (seed, step) noise); a step boundary is one `LatentSampler.advance` over every live walk (one
UNet call per size and network), then one batched VAE decode per size of the walks that finished. The
sampling math, the hybrid of an imported pair and its hand-offs are documented there.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

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
from fewstep.engines.specs import GuidanceRule, ImageSpec, Sizes
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, InvalidRequest
from fewstep.models.architectures import architecture
from fewstep.models.checkpoint import read_manifest
from fewstep.models.families import Recipe
from fewstep.models.latent_sampler import Draw, LatentSampler
from fewstep.models.pipelines import LatentNets, size_multiple

log = logging.getLogger("fewstep.engines")
EDITS_NEED_TORCH = "an edit needs the pipeline's VAE encoder, which is not among the exported graphs: serve on torch"


def latent_spec(
    manifest: dict[str, Any],
    version: str,
    backend_name: str,
    precision: str,
    sides: tuple[int, int] | None,
    hybrid: bool = False,
    hybrid_reason: str | None = None,
) -> ImageSpec:
    """The spec of an imported pipeline from its manifest; `sides` (low, high) bound the sizes served."""
    recipe = Recipe.from_dict(manifest.get("recipe") or {})
    g = recipe.guidance
    multiple = size_multiple(manifest)
    pair = manifest.get("hybrid") or {}
    arch = architecture(manifest["pipeline"]["arch"])
    edits_reason = (
        EDITS_NEED_TORCH
        if backend_name != "torch"
        else None
        if arch.edits
        else f"edits of {arch.name} pipelines are not served yet (no img2img parity test)"
    )
    teacher_nfe = 2 if float(pair.get("teacher_guidance", 0.0)) > 1.0 else 1
    return ImageSpec(
        model=manifest["name"],
        version=version,
        step_counts=tuple(recipe.steps),
        default_steps=recipe.default_steps,
        size=str(manifest["native_size"]),
        backend=backend_name,
        precision=precision,
        hybrid=hybrid,
        hybrid_reason=hybrid_reason,
        teacher_nfe=teacher_nfe,
        text_cost=arch.text_cost,
        sizes=None if sides is None else Sizes(max(sides[0], multiple), sides[1], multiple),
        guidance=GuidanceRule(g.mode, g.low, g.high, g.default),
        family=recipe.family,
        edits=edits_reason is None,
        edit_rule=recipe.edit_rule,
        edits_reason=edits_reason,
    )


class LatentEngine:
    """Runs one imported pipeline version (and its base model, for hybrid items) on one backend."""

    def __init__(
        self,
        folder: Path,
        backend: str = "torch",
        precision: str = "fp32",
        version: str | None = None,
        teacher_folder: Path | None = None,
        sides: tuple[int, int] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        prompt_cache_bytes: int = 256 << 20,
    ) -> None:
        manifest = read_manifest(folder)
        if manifest.get("kind") != "diffusers":
            raise CheckpointError(f"{folder}: kind {manifest.get('kind')!r} is not an imported diffusers pipeline")
        self.folder, self.manifest, self.teacher_folder = folder, manifest, teacher_folder
        self.backend, self.precision, self.device, self.dtype = backend, precision, device, dtype
        self.spec = latent_spec(
            manifest,
            version or str(manifest.get("version", "1")),
            backend,
            precision,
            sides,
            teacher_folder is not None,
        )
        self._cache_bytes = prompt_cache_bytes
        self.sampler: LatentSampler | None = None
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        b = backend(self.backend)
        nets = b.latent(self.folder, self.manifest, self.precision, self.device, self.dtype)
        base: LatentNets | None = None
        if self.teacher_folder is not None:
            try:
                teacher = read_manifest(self.teacher_folder)
                base = b.latent(self.teacher_folder, teacher, self.precision, self.device, self.dtype)
            except CheckpointError as e:
                self.spec = dataclasses.replace(self.spec, hybrid=False, hybrid_reason=str(e))
        self.sampler = LatentSampler(self.folder, self.manifest, nets, base, self.device, self._cache_bytes)

    def warmup(self) -> None:
        items = [ImageItem("warm-up", seed=0, steps=n) for n in self.spec.steps]
        if self.spec.hybrid:
            items += [ImageItem("warm-up", seed=0, steps=n, hybrid=True) for n in self.spec.steps if n > 1]
        for r in self.run(items):
            if isinstance(r, FewstepError):
                raise CheckpointError(f"{self.folder.name}: warm-up failed: {r}")

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        """`run_to_completion` on this engine: one outcome per item."""
        return run_to_completion(self, items, stop)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.clear()
        self.sampler = None

    # -- steps ------------------------------------------------------------------------------------
    def draw(self, item: ImageItem) -> Draw:
        """What the sampler makes for a (validated) item: sizes and guidance defaults applied."""
        guidance = self.spec.guidance.default if item.guidance is None else item.guidance
        width, height = item.width or self.spec.width, item.height or self.spec.height
        return Draw(
            item.prompt,
            item.seed,
            item.steps,
            width,
            height,
            guidance,
            item.negative_prompt,
            self.spec.uses_cfg(item),
            item.hybrid,
            None if item.image is None else decode_png(item.image, width, height),
            1.0 if item.strength is None else item.strength,
        )

    def begin(self, items: list[ImageItem]) -> list[Slot]:
        if self.sampler is None:
            raise RuntimeError("LatentEngine.begin called before load()")
        slots = [Slot(item=it) for it in items]
        good = []
        for slot in slots:
            try:
                self.spec.validate(slot.item)
                good.append(slot)
            except FewstepError as e:
                slot.outcome = e
        draws = []
        for slot in list(good):
            try:
                draws.append(self.draw(slot.item))
            except (ValueError, OSError) as e:  # a starting image that is not the item's PNG (a queue record gone bad)
                slot.outcome = InvalidRequest("image", f"the starting image does not decode: {e}")
                good.remove(slot)
        for slot, walk in zip(good, self.sampler.start(draws), strict=True):
            slot.state = walk
        return slots

    def _shown(self, s: Slot) -> int | None:
        """The partial image index `s` shows after the step it just took, if any."""
        return None if s.state.done else partial_index(self.spec.run_steps(s.item), s.item.partials, s.steps_run)

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live or self.sampler is None:
            return
        with self._lock:
            try:
                self.sampler.advance([s.state for s in live])
                for s in live:
                    s.steps_run += 1
                showing = [(s, k) for s in live if (k := self._shown(s)) is not None]
                decoded = self.sampler.decode([s.state for s, _ in showing], True)
                for (s, k), pixels in zip(showing, decoded, strict=True):
                    s.partial = None if pixels is None else (k, pixels)
                finished = [s for s in live if s.state.done]
                for s, pixels in zip(finished, self.sampler.decode([s.state for s in finished]), strict=True):
                    it = s.item
                    if pixels is None:
                        s.outcome = GenerationFailed("generation failed: non-finite output")
                    else:
                        s.outcome = ImageResult(pixels, it.seed, it.steps, self.spec.nfe(it), self.spec.version)
                    s.state = None
            except Exception as e:  # an engine fault fails these items, never the process
                log.warning(
                    "%s:%s step failed for %d items: %s: %s",
                    self.spec.model,
                    self.spec.version,
                    len(live),
                    type(e).__name__,
                    e,
                )
                for s in live:
                    if not s.done:
                        s.outcome = GenerationFailed(f"generation failed: {type(e).__name__}")
                        s.state = None
