"""Sampling users' diffusers students in latent space: each image walks its family's scheduler, UNet calls batched.

`LatentSampler` holds one imported pipeline's networks (any `LatentNets`: torch modules or ONNX graphs), its
tokenizers and its family recipe (`models.families`). A `Walk` is one image on its way: its own copy of the
family's diffusers scheduler (the position is scheduler state), its latents and conditioning. `advance` moves
a set of walks one step:

1. walks are grouped by latent size (different sizes never share a tensor) and by which network takes their
   step (a hybrid walk's first step is the base model's);
2. each group is one UNet call: every walk's latents scaled by its own scheduler, its prompt's states (cached
   per prompt), its guidance embedding (LCM), SDXL's pooled embeds and time ids; walks with classic CFG add
   their unconditional row;
3. each walk takes its step with its own scheduler (the family's math, exactly:
   `tests/engines/test_latent.py` checks every family against the diffusers pipeline), the noise drawn from
   a generator seeded by (seed, step) alone, so an image never depends on its neighbours.

A TrigFlow family's walks (SANA-Sprint's SCM scheduler) hold the VAE's latents times the scheduler's `sigma_data`,
as its pipeline does; its denoiser is given and gives the VAE's units, and its image is the last step's x0 estimate
(`Recipe.latent_scale`, `Recipe.ends_on_estimate`).

`decode` turns finished walks into pixels, batched by size. The latent engine schedules walks across
requests; exporters call `sample` to compare their graphs with the torch networks.

The hybrid of an imported pair: the base model's denoiser takes the first timestep, with its guidance as the pair
says, and the student the rest. The hand-off is the pair's: `renoise` (the diversity-distillation paper's
code: the base prediction goes through the student's own scheduler step, e.g. DMD2's LCM step, x0 re-noised
to the next timestep) or `trajectory` (a deterministic DDIM step of the base model to the student's next
timestep, which keeps the seed's noise; schedulers that work in ᾱ-space only). For flow pairs the same two:
the base's Euler step to the next sigma (`trajectory`, their default: a flow model's x0 estimate at σ = 1 is
the same for every seed, so re-noising it forgets the seed) or its x0 estimate re-noised with fresh noise.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.errors import CheckpointError
from fewstep.models.architectures import architecture, stack
from fewstep.models.families import Recipe, mu_of, scheduler_class
from fewstep.models.pipelines import (
    LatentNets,
    TextOut,
    guidance_embedding,
    load_tokenizers,
    postprocess,
    time_ids,
    vae_factor,
)
from fewstep.models.sampling import from_pixels
from fewstep.models.schedules import ENCODE_DRAW, item_noise, kept_steps, step_generator

TRAJECTORY_SCHEDULERS = ("LCMScheduler", "TCDScheduler", "DDIMScheduler")
ESTIMATES = ("pred_original_sample", "denoised", "pred_noised_sample")
"""Where a scheduler's step output keeps its x0 estimate, best first."""


@dataclass(frozen=True)
class Draw:
    """One image to make. `guidance` is the scale in effect (the family's default already applied); `cfg`
    says whether the student runs classic CFG for it; `hybrid` gives its first step to the base model."""

    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float = 0.0
    negative_prompt: str | None = None
    cfg: bool = False
    hybrid: bool = False
    image: np.ndarray | None = field(default=None, compare=False)
    """An edit's starting image, (H, W, 3) uint8 at the draw's size; None: text to image."""
    strength: float = 1.0


@dataclass(eq=False)
class Walk:
    """One image's way through its steps."""

    draw: Draw
    scheduler: Any
    timesteps: list[Any]
    """Its timesteps: integers, a flow family's sigma × 1000, or a TrigFlow family's angles."""
    latents: torch.Tensor
    cond: TextOut
    uncond: TextOut | None
    k: int = 0
    estimate: torch.Tensor | None = None
    """The scheduler's x0 estimate at the last step (`pred_original_sample`, LCM's `denoised`; TCD's
    `pred_noised_sample`, the nearest it gives): what a partial image shows."""

    @property
    def done(self) -> bool:
        return self.k >= len(self.timesteps)

    @property
    def size(self) -> tuple[int, int]:
        return self.draw.height, self.draw.width

    @property
    def by_base(self) -> bool:
        """Whether the base model takes this walk's next step (a hybrid's first)."""
        return self.draw.hybrid and self.k == 0


def scaled(scheduler: Any, latents: torch.Tensor, t: Any) -> torch.Tensor:
    """The denoiser's input at `t`: the scheduler's `scale_model_input` (flow schedulers have none: identity)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def noised(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`clean` latents noised to timestep `t` by the scheduler's own rule (`add_noise`; flow schedulers:
    `scale_noise`, x_t = (1 − σ) x0 + σ ε)."""
    add = getattr(scheduler, "add_noise", None)
    return add(clean, noise, t) if add is not None else scheduler.scale_noise(clean, t, noise)


def text_bytes(t: TextOut) -> int:
    """Bytes one prompt's conditioning holds."""
    return sum(x.numel() * x.element_size() for x in (t.states, t.pooled, t.mask) if x is not None)


class LatentSampler:
    """One imported pipeline version's sampling, on the networks given (and the base model's, for hybrids)."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        nets: LatentNets,
        base: LatentNets | None = None,
        device: str = "cpu",
        cache_bytes: int = 256 << 20,
    ) -> None:
        self.folder, self.nets, self.base, self.device = folder, nets, base, device
        self.recipe = Recipe.from_dict(manifest.get("recipe") or {})
        self.pair = dict(manifest.get("hybrid") or {})
        self.base_guidance = float(self.pair.get("teacher_guidance", 0.0))
        self.trajectory = self.pair.get("handoff") == "trajectory"
        self.flow = bool(self.recipe.sigmas)
        if self.trajectory and not self.flow and self.recipe.scheduler not in TRAJECTORY_SCHEDULERS:
            raise CheckpointError(f"{folder.name}: the trajectory hand-off needs one of {TRAJECTORY_SCHEDULERS}")
        self.factor = vae_factor(manifest)
        try:
            side = int(str(manifest.get("native_size", "512x512")).split("x")[0]) // self.factor
        except ValueError as e:
            raise CheckpointError(f"{folder.name}: manifest's `native_size` is not WxH") from e
        self.native = (side, side)
        self.adapter = architecture(nets.arch).adapter
        self.channels = int(manifest.get("latent", {}).get("channels", 4))
        self.tokenizers = load_tokenizers(folder, manifest)
        index = json.loads((folder / "model_index.json").read_text())
        self.zero_negative = nets.arch == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
        self.templates = self._schedulers(folder)
        self._cache: OrderedDict[tuple[str, str | None], TextOut] = OrderedDict()
        self._cache_budget, self._cache_bytes = cache_bytes, 0
        self._cache_lock = threading.Lock()

    @property
    def base_cfg(self) -> bool:
        """Whether the base model's step of a hybrid runs classic CFG (two rows)."""
        return self.base_guidance > 1.0

    def _schedulers(self, folder: Path) -> dict[int, Any]:
        """One scheduler per step count, its timesteps checked against the recipe's."""
        cls = scheduler_class(self.recipe.scheduler)
        templates = {}
        for n, ts in self.recipe.timesteps.items():
            sched = cls.from_config(self.recipe.scheduler_config)
            self.recipe.set_timesteps(sched, n, self._mu(self.native, n), self.device)
            if n in self.recipe.sigmas:
                same = all(abs(float(a) - b) < 1e-3 for a, b in zip(sched.timesteps, ts, strict=True))
            elif self.recipe.kind == "trigflow":
                same = [float(t) for t in sched.timesteps[:-1]] == ts
            else:
                same = [int(t) for t in sched.timesteps] == ts
            if not same:
                raise CheckpointError(f"{folder.name}: the scheduler's {n}-step timesteps are not the recipe's {ts}")
            templates[n] = sched
        return templates

    def _mu(self, cells: tuple[int, int], steps: int) -> float | None:
        """The recipe's `mu` for latents of `cells` (h, w) in `steps` steps; None for a static shift."""
        rule = self.recipe.mu
        return None if rule is None else mu_of(rule, self.adapter.tokens(*cells), steps)

    # -- conditioning -----------------------------------------------------------------------------
    def text(self, prompts: list[tuple[str, str | None]]) -> list[TextOut]:
        """Conditioning per (prompt, negative-or-None), from the prompt cache where it is there: least recently used
        entries leave once the cache holds more than its byte budget (a T5 or LLM encoding of one prompt is
        megabytes; the encoders are the expensive part of a 1–4 step request)."""
        found: dict[tuple[str, str | None], TextOut] = {}
        with self._cache_lock:
            for key in dict.fromkeys(prompts):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            ids, masks = self.tokenizers([p for p, _ in missing])
            out = self.nets.encode(ids, masks)
            with self._cache_lock:
                for i, key in enumerate(missing):
                    found[key] = entry = out.take([i])
                    if key not in self._cache:
                        self._cache[key] = entry
                        self._cache_bytes += text_bytes(entry)
                while self._cache and self._cache_bytes > self._cache_budget:
                    _, dropped = self._cache.popitem(last=False)
                    self._cache_bytes -= text_bytes(dropped)
        return [found[p] for p in prompts]

    def _uncond(self, cond: TextOut, negative: str | None) -> TextOut:
        """The unconditional row, as the pipelines make it: SDXL zeros when no negative prompt is given (and the
        pipeline says so), else the negative prompt's (or the empty prompt's) encoding."""
        if negative is None and self.zero_negative:
            return TextOut(
                torch.zeros_like(cond.states),
                None if cond.pooled is None else torch.zeros_like(cond.pooled),
                cond.mask,
            )
        return self.text([(negative or "", None)])[0]

    def clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0

    # -- walks ------------------------------------------------------------------------------------
    def start(self, draws: list[Draw]) -> list[Walk]:
        """Walks at their first step: each with its own scheduler and the seed's initial latents (an edit's: its
        image encoded and noised to the first timestep it keeps; the images of one size in one VAE call)."""
        conds = self.text([(d.prompt, None) for d in draws]) if draws else []
        walks = []
        for d, cond in zip(draws, conds, strict=True):
            sched = copy.deepcopy(self.templates[d.steps])
            timesteps: list[Any] = list(self.recipe.timesteps[d.steps])
            if self.recipe.mu is not None:  # the shift follows this image's sequence length
                mu = self._mu((d.height // self.factor, d.width // self.factor), d.steps)
                self.recipe.set_timesteps(sched, d.steps, mu, self.device)
                timesteps = [float(t) for t in sched.timesteps]
            shape = (1, self.channels, d.height // self.factor, d.width // self.factor)
            noise = item_noise(d.seed, 0, shape).to(self.device)
            first = 0 if d.image is None else d.steps - kept_steps(d.steps, d.strength, self.recipe.edit_rule)
            if d.image is not None and hasattr(sched, "set_begin_index"):
                sched.set_begin_index(first * sched.order)
            needs_uncond = d.cfg or (d.hybrid and self.base_cfg)
            uncond = self._uncond(cond, d.negative_prompt) if needs_uncond else None
            start = noise * getattr(sched, "init_noise_sigma", 1.0) * self.recipe.latent_scale
            latents = start if d.image is None else noise
            walks.append(Walk(d, sched, timesteps, latents, cond, uncond, k=first))
        self._edit_starts([w for w in walks if w.draw.image is not None])
        return walks

    def _edit_starts(self, walks: list[Walk]) -> None:
        """Edits' starting latents, as diffusers' img2img pipelines make them: the image's latents (its VAE
        posterior sampled with the (seed, `ENCODE_DRAW`) noise) noised by the walk's scheduler to the first
        timestep it keeps with the (seed, 0) noise the walk holds; the images of one size in one VAE call."""
        if not walks:
            return
        encode = getattr(self.nets, "encode_image", None)
        if encode is None:
            raise CheckpointError("these networks have no VAE encoder: edits are not served on them")
        by_size: dict[tuple[int, int], list[Walk]] = {}
        for w in walks:
            by_size.setdefault(w.size, []).append(w)
        for group in by_size.values():
            pixels = torch.stack([from_pixels(w.draw.image) for w in group if w.draw.image is not None])
            shape = tuple(group[0].latents.shape)
            draws = torch.cat([item_noise(w.draw.seed, ENCODE_DRAW, shape) for w in group])
            clean = encode(pixels.to(self.device), draws)
            for j, w in enumerate(group):
                t = w.scheduler.timesteps[w.k : w.k + 1]
                w.latents = noised(w.scheduler, clean[j : j + 1], w.latents, t)

    def advance(self, walks: list[Walk]) -> None:
        """Every unfinished walk one step on: one UNet call per (size, network) group."""
        groups: dict[tuple[tuple[int, int], bool], list[Walk]] = {}
        for w in walks:
            if not w.done:
                groups.setdefault((w.size, w.by_base), []).append(w)
        for (_, by_base), group in groups.items():
            self._step(group, by_base)

    def _step(self, group: list[Walk], by_base: bool) -> None:
        nets = self.base if by_base else self.nets
        if nets is None:
            raise CheckpointError("a hybrid walk needs the base model's networks")
        xs, ts, texts, tids, tconds, spans = [], [], [], [], [], []
        for w in group:
            t = w.scheduler.timesteps[w.k]
            x = w.latents if by_base and self.trajectory else scaled(w.scheduler, w.latents, t)
            rows = [w.uncond, w.cond] if (self.base_cfg if by_base else w.draw.cfg) else [w.cond]
            spans.append(len(rows))
            for r in rows:
                assert r is not None
                xs.append(x)
                ts.append(float(t))
                texts.append(r)
                if self.adapter.size_ids:  # a hybrid's base is of the student's architecture (import checks)
                    tids.append(time_ids(*w.size))
                if nets.time_cond_dim is not None:
                    tconds.append(guidance_embedding(torch.tensor([w.draw.guidance - 1.0]), nets.time_cond_dim))
                elif not by_base and self.recipe.guidance.mode == "embedded":  # a transformer's: the scale itself
                    tconds.append(torch.tensor([w.draw.guidance]))
        dev = self.device
        text = stack(texts)
        units = self.recipe.latent_scale  # the denoiser takes and gives the VAE's units
        pred = (
            nets.unet(
                torch.cat(xs) / units,
                torch.tensor(ts, device=dev),
                text.states,
                torch.cat(tconds).to(dev) if tconds else None,
                text.pooled,
                torch.cat(tids).to(dev) if tids else None,
                mask=text.mask,
            )
            * units
        )
        at = 0
        for w, n in zip(group, spans, strict=True):
            out = pred[at : at + n]
            at += n
            scale = self.base_guidance if by_base else w.draw.guidance
            eps = out[0:1] + scale * (out[1:2] - out[0:1]) if n == 2 else out
            if by_base and self.flow:
                w.estimate, w.latents = self._flow_handoff(w, eps)
            elif by_base and self.trajectory:
                w.estimate, w.latents = self._ddim_to_next(w, eps)
            else:
                g = step_generator(w.draw.seed, w.k + 1)
                t = w.scheduler.timesteps[w.k]
                out = w.scheduler.step(eps, t, w.latents, generator=g, **self.recipe.step_kwargs, return_dict=True)
                w.latents = out.prev_sample
                w.estimate = next(
                    (e for e in (getattr(out, n, None) for n in ESTIMATES) if e is not None), out.prev_sample
                )
            w.k += 1

    def _flow_handoff(self, w: Walk, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A flow base model's step: its x0 estimate (x − σ v) and the next latents, along its ODE (the scheduler's
        Euler step: the seed's noise kept) or re-noised to the next sigma with the (seed, k + 1) noise."""
        t = w.scheduler.timesteps[w.k]
        sigma, after = float(w.scheduler.sigmas[w.k]), float(w.scheduler.sigmas[w.k + 1])
        euler = w.scheduler.step(v, t, w.latents, return_dict=True).prev_sample  # also moves its step index on
        x0 = w.latents - sigma * v
        if self.trajectory:
            return x0, euler
        return x0, (1 - after) * x0 + after * item_noise(w.draw.seed, w.k + 1, tuple(x0.shape)).to(x0)

    @staticmethod
    def _ddim_to_next(w: Walk, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A deterministic DDIM step from the walk's first timestep to its second (the seed's noise kept): the x0
        estimate and the next latents."""
        a = w.scheduler.alphas_cumprod
        a0, a1 = a[w.timesteps[0]], a[w.timesteps[1]]
        x0 = (w.latents - (1 - a0) ** 0.5 * eps) / a0**0.5
        return x0, a1**0.5 * x0 + (1 - a1) ** 0.5 * eps

    def decode(self, walks: list[Walk], estimates: bool = False) -> list[np.ndarray | None]:
        """Pixels (H, W, 3) uint8 of finished walks (or, with `estimates`, of the walks' last x0 estimates: partial
        images), decoded in one VAE call per size; None where the output is not finite."""
        out: list[np.ndarray | None] = [None] * len(walks)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(walks):
            by_size.setdefault(w.size, []).append(i)
        for rows in by_size.values():
            latents = [self._shown(walks[i], estimates or self.recipe.ends_on_estimate) for i in rows]
            images = self.nets.decode(torch.cat(latents))
            finite = torch.isfinite(images).flatten(1).all(dim=1)
            pixels = postprocess(images.nan_to_num(0.0))
            for j, i in enumerate(rows):
                out[i] = pixels[j] if bool(finite[j]) else None
        return out

    def _shown(self, w: Walk, estimate: bool) -> torch.Tensor:
        """The walk's latents (or its x0 estimate) in the VAE's units."""
        x = w.estimate if estimate and w.estimate is not None else w.latents
        return x / self.recipe.latent_scale

    def sample(self, draws: list[Draw]) -> list[np.ndarray | None]:
        """Every draw to completion, in one running batch."""
        walks = self.start(draws)
        while not all(w.done for w in walks):
            self.advance(walks)
        return self.decode(walks)
