"""The latent engine: users' diffusers students (SD 1.x/2.x and SDXL UNet pipelines), step by step.

A `StepEngine` over an imported pipeline (`models.importing`): items at different steps, step counts,
sizes and guidance share a running batch. Per step boundary:

1. items are grouped by latent size (items of different sizes never share a tensor) and by which network
   takes their step (a hybrid item's first step is the teacher's);
2. each group is one UNet call: every item's latents scaled by its own scheduler, its prompt's states
   (cached per prompt), its guidance embedding (LCM), SDXL's pooled embeds and time ids; items with
   classic CFG add their unconditional row;
3. each item takes its step with its own copy of the family's diffusers scheduler (the family's math,
   exactly: `tests/engines/test_latent.py` checks every family against the diffusers pipeline), with the
   noise drawn from a generator seeded by (seed, step) alone, so an image never depends on its neighbours;
4. items that finished are decoded by the VAE, batched by size.

The hybrid of an imported pair (`fewstep import … --teacher BASE`): the base model's UNet takes the first
timestep, with its guidance as the pair says, and the student the rest. The hand-off is the pair's:
`renoise` (the diversity-distillation paper's code: the base prediction goes through the student's own
scheduler step, e.g. DMD2's LCM step, x0 re-noised to the next timestep) or `trajectory` (a deterministic
DDIM step of the base model to the student's next timestep, which keeps the seed's noise; schedulers that
work in ᾱ-space only).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.engines.backends import backend
from fewstep.engines.base import ImageItem, ImageResult, Outcome, Slot, StopCheck, run_to_completion
from fewstep.engines.specs import GuidanceRule, ImageSpec, Sizes
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed
from fewstep.models.checkpoint import read_manifest
from fewstep.models.families import Recipe, scheduler_class
from fewstep.models.pipelines import (
    LatentNets,
    TextOut,
    guidance_embedding,
    load_tokenizers,
    postprocess,
    time_ids,
    vae_factor,
)
from fewstep.models.schedules import item_noise, step_generator

TRAJECTORY_SCHEDULERS = ("LCMScheduler", "TCDScheduler", "DDIMScheduler")


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
    factor = vae_factor(manifest)
    pair = manifest.get("hybrid") or {}
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
        sizes=None if sides is None else Sizes(max(sides[0], factor), sides[1], factor),
        guidance=GuidanceRule(g.mode, g.low, g.high, g.default),
        family=recipe.family,
    )


@dataclass(eq=False)
class _Item:
    """One image's walk: its own scheduler (the position is scheduler state), latents and conditioning."""

    scheduler: Any
    timesteps: list[int]
    latents: torch.Tensor
    cond: TextOut
    uncond: TextOut | None
    guidance: float
    size: tuple[int, int]
    k: int = 0

    @property
    def done(self) -> bool:
        return self.k >= len(self.timesteps)


class LatentEngine:
    """Runs one imported pipeline version (and its teacher, for hybrid items) on one backend."""

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
        cache_prompts: int = 1024,
    ) -> None:
        manifest = read_manifest(folder)
        if manifest.get("kind") != "diffusers":
            raise CheckpointError(f"{folder}: kind {manifest.get('kind')!r} is not an imported diffusers pipeline")
        self.folder, self.manifest, self.teacher_folder = folder, manifest, teacher_folder
        self.backend, self.precision, self.device, self.dtype = backend, precision, device, dtype
        self.recipe = Recipe.from_dict(manifest.get("recipe") or {})
        self.spec = latent_spec(
            manifest,
            version or str(manifest.get("version", "1")),
            backend,
            precision,
            sides,
            teacher_folder is not None,
        )
        self.pair = dict(manifest.get("hybrid") or {})
        if self.pair.get("handoff") == "trajectory" and self.recipe.scheduler not in TRAJECTORY_SCHEDULERS:
            raise CheckpointError(f"{folder.name}: the trajectory hand-off needs one of {TRAJECTORY_SCHEDULERS}")
        self.factor = vae_factor(manifest)
        self.channels = int(manifest.get("latent", {}).get("channels", 4))
        self._nets: LatentNets | None = None
        self._teacher: LatentNets | None = None
        self._templates: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[str, str | None], TextOut] = OrderedDict()
        self._cache_size = cache_prompts
        self._lock = threading.Lock()
        self._steps = 0
        self._last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        b = backend(self.backend)
        self._nets = b.latent(self.folder, self.manifest, self.precision, self.device, self.dtype)
        self.tokenizers = load_tokenizers(self.folder, self.manifest)
        index = read_manifest_json(self.folder / "model_index.json")
        self.zero_negative = self._nets.arch == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
        cls = scheduler_class(self.recipe.scheduler)
        for n, ts in self.recipe.timesteps.items():
            sched = cls.from_config(self.recipe.scheduler_config)
            if self.recipe.custom_timesteps:
                sched.set_timesteps(timesteps=ts, device=self.device)
            else:
                sched.set_timesteps(n, device=self.device)
            if [int(t) for t in sched.timesteps] != ts:
                raise CheckpointError(
                    f"{self.folder.name}: the scheduler's {n}-step timesteps are not the recipe's {ts}"
                )
            self._templates[n] = sched
        if self.teacher_folder is not None:
            try:
                teacher = read_manifest(self.teacher_folder)
                self._teacher = b.latent(self.teacher_folder, teacher, self.precision, self.device, self.dtype)
            except CheckpointError as e:
                self.spec = dataclasses.replace(self.spec, hybrid=False, hybrid_reason=str(e))

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
        self._nets = self._teacher = None
        self._cache.clear()

    def health(self) -> dict[str, Any]:
        return {
            "loaded": self._nets is not None,
            "steps": self._steps,
            "last_error": self._last_error,
            "checked_at": time.time(),
        }

    # -- conditioning -----------------------------------------------------------------------------
    def _text(self, prompts: list[tuple[str, str | None]]) -> list[TextOut]:
        """Conditioning per (prompt, negative-or-None), cached; `("", None)`-style uncond rows included."""
        assert self._nets is not None
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            texts = [p for p, _ in missing]
            ids, masks = self.tokenizers(texts)
            out = self._nets.encode(ids, masks)
            with self._lock:
                for i, key in enumerate(missing):
                    self._cache[key] = out.take([i])
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [self._cache[p] for p in prompts]

    def _uncond(self, cond: TextOut, negative: str | None) -> TextOut:
        """The unconditional row, as the pipelines make it: SDXL zeros when no negative prompt is given (and the
        pipeline says so), else the negative prompt's (or the empty prompt's) encoding."""
        if negative is None and self.zero_negative:
            return TextOut(
                torch.zeros_like(cond.states), None if cond.pooled is None else torch.zeros_like(cond.pooled)
            )
        return self._text([(negative or "", None)])[0]

    # -- steps ------------------------------------------------------------------------------------
    def begin(self, items: list[ImageItem]) -> list[Slot]:
        if self._nets is None:
            raise RuntimeError("LatentEngine.begin called before load()")
        slots = [Slot(item=it) for it in items]
        good = []
        for slot in slots:
            try:
                self.spec.validate(slot.item)
                good.append(slot)
            except FewstepError as e:
                slot.outcome = e
        conds = self._text([(s.item.prompt, None) for s in good]) if good else []
        for slot, cond in zip(good, conds, strict=True):
            it = slot.item
            sched = copy.deepcopy(self._templates[it.steps])
            w, h = it.width or self.spec.width, it.height or self.spec.height
            shape = (1, self.channels, h // self.factor, w // self.factor)
            latents = item_noise(it.seed, 0, shape).to(self.device) * sched.init_noise_sigma
            guidance = self.spec.guidance.default if it.guidance is None else it.guidance
            cfg = self.spec.uses_cfg(it) or (it.hybrid and self.spec.teacher_nfe == 2)
            uncond = self._uncond(cond, it.negative_prompt) if cfg else None
            slot.state = _Item(sched, self.recipe.timesteps[it.steps], latents, cond, uncond, guidance, (h, w))
        return slots

    def advance(self, slots: list[Slot]) -> None:
        live = [s for s in slots if not s.done]
        if not live:
            return
        with self._lock:
            try:
                groups: dict[tuple[tuple[int, int], bool], list[Slot]] = {}
                for s in live:
                    by_teacher = s.item.hybrid and s.state.k == 0
                    groups.setdefault((s.state.size, by_teacher), []).append(s)
                for (_, by_teacher), group in groups.items():
                    self._step(group, by_teacher)
                self._decode([s for s in live if s.state.done])
            except Exception as e:  # an engine fault fails these items, never the process
                self._last_error = f"{type(e).__name__}: {e}"
                for s in live:
                    if not s.done:
                        s.outcome = GenerationFailed(f"generation failed: {type(e).__name__}")
                        s.state = None
            finally:
                self._steps += 1

    def _step(self, group: list[Slot], by_teacher: bool) -> None:
        """One UNet call for `group` (same size, same network), then each item's scheduler step."""
        nets = self._teacher if by_teacher else self._nets
        assert nets is not None
        teacher_cfg = by_teacher and self.spec.teacher_nfe == 2
        xs, ts, states, pooled, tids, tconds, spans = [], [], [], [], [], [], []
        for s in group:
            it: _Item = s.state
            t = it.scheduler.timesteps[it.k]
            x = (
                it.latents
                if by_teacher and self.pair.get("handoff") == "trajectory"
                else it.scheduler.scale_model_input(it.latents, t)
            )
            cfg = teacher_cfg if by_teacher else self.spec.uses_cfg(s.item)
            rows = [it.uncond, it.cond] if cfg else [it.cond]
            assert all(r is not None for r in rows)
            spans.append(len(rows))
            for r in rows:
                xs.append(x)
                ts.append(float(t))
                states.append(r.states)  # type: ignore[union-attr]
                if r.pooled is not None:  # type: ignore[union-attr]
                    pooled.append(r.pooled)  # type: ignore[union-attr]
                    tids.append(time_ids(*it.size))
                if nets.time_cond_dim is not None:
                    tconds.append(guidance_embedding(torch.tensor([it.guidance - 1.0]), nets.time_cond_dim))
        dev = self.device
        pred = nets.unet(
            torch.cat(xs),
            torch.tensor(ts, device=dev),
            torch.cat(states),
            torch.cat(tconds).to(dev) if tconds else None,
            torch.cat(pooled) if pooled else None,
            torch.cat(tids).to(dev) if tids else None,
        )
        at = 0
        for s, n in zip(group, spans, strict=True):
            it = s.state
            out = pred[at : at + n]
            at += n
            scale = float(self.pair.get("teacher_guidance", 0.0)) if by_teacher else it.guidance
            eps = out[0:1] + scale * (out[1:2] - out[0:1]) if n == 2 else out
            if by_teacher and self.pair.get("handoff") == "trajectory":
                it.latents = self._ddim_to_next(it, eps)
            else:
                g = step_generator(s.item.seed, it.k + 1)
                t = it.scheduler.timesteps[it.k]
                it.latents = it.scheduler.step(
                    eps, t, it.latents, generator=g, **self.recipe.step_kwargs, return_dict=False
                )[0]
            it.k += 1
            s.steps_run += 1

    def _ddim_to_next(self, it: _Item, eps: torch.Tensor) -> torch.Tensor:
        """A deterministic DDIM step from the item's first timestep to its second (the seed's noise kept)."""
        a = it.scheduler.alphas_cumprod
        a0, a1 = a[it.timesteps[0]], a[it.timesteps[1]]
        x0 = (it.latents - (1 - a0) ** 0.5 * eps) / a0**0.5
        return a1**0.5 * x0 + (1 - a1) ** 0.5 * eps

    def _decode(self, finished: list[Slot]) -> None:
        assert self._nets is not None
        by_size: dict[tuple[int, int], list[Slot]] = {}
        for s in finished:
            by_size.setdefault(s.state.size, []).append(s)
        for group in by_size.values():
            latents = torch.cat([s.state.latents for s in group])
            images = self._nets.decode(latents)
            if not torch.isfinite(images).all():
                bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            else:
                bad = torch.zeros(len(group), dtype=torch.bool)
            pixels = postprocess(images.nan_to_num(0.0))
            for i, s in enumerate(group):
                it = s.item
                if bad[i]:
                    s.outcome = GenerationFailed("generation failed: non-finite output")
                else:
                    s.outcome = ImageResult(pixels[i], it.seed, it.steps, self.spec.nfe(it), self.spec.version)
                s.state = None


def read_manifest_json(path: Path) -> dict[str, Any]:
    """A small JSON object of the registry version (already hash-checked)."""
    import json

    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
