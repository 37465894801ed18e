"""Few-step bidirectional Wan 2.1 students, as data: how each family denoises a whole clip in a few steps.

A bidirectional student denoises every latent frame of a clip together (the stock `WanTransformer3DModel`, full
attention over the clip, no cache), in a handful of steps, with no classifier-free guidance: one network call per
step, on the prompt alone. The families differ in data (`ClipFamily`):

* **the timesteps** of an n-step clip, from the first n entries of the family's list, by one of three rules
  (`Timesteps`): `warp`, an entry d read from the shifted 1000-step table at 1000 − d; `table`, d is the timestep
  itself; σ of either is the table's σ at the nearest table timestep (`models.causal_families.table_timesteps` and
  `table_sigmas`, the lookup the causal families use); `trigflow`, an entry is a TrigFlow time a, σ = sin a /
  (sin a + cos a), and the network's timestep is 1000·σ;
* **the update** between steps (`Update`): `euler`, the deterministic flow step x' = x + (σ' − σ)·v; `renoise`,
  the DMD / consistency step x0 = x − σ·v, then x' = (1 − σ')·x0 + σ'·ε with **fresh** noise ε (after the last
  step, x0 is the clip). Every clip starts from σ₀·ε₀ (σ₀ is 1 for the tables; rCM starts below 1);
* **the step counts served**: the distilled list's length, or (rCM) any prefix of it.

Sources:

* wan-lightning: `ModelTC/LightX2V` `lightx2v/models/schedulers/wan/step_distill/scheduler.py`
  (`WanStepDistillScheduler`: `sigmas = linspace(1, 0, 1001)[:-1]` shifted by `sample_shift`, indices
  1000 − `denoising_step_list`, `step_post`: x − σ·v + σ_next·v) and `configs/distill/wan21/
  wan_t2v_distill_lora_4step_cfg.json` (`[1000, 750, 500, 250]`, shift 5, `enable_cfg false`): t = [1000, 937.5,
  833.3, 625]. The `lightx2v/Wan2.1-Distill-Loras` LoRAs and the merged StepDistill-CfgDistill models.
* fastwan: `hao-ai-lab/FastVideo` `fastvideo/pipelines/stages/denoising.py` (`DmdDenoisingStage`: the network at
  the raw `dmd_denoising_steps`, `pred_noise_to_pred_video` with σ looked up in `FlowMatchEulerDiscreteScheduler
  (shift=8.0)`'s table, then `add_noise(pred_video, randn, next_t)`) and `fastvideo/configs/pipelines/wan.py`
  (`FastWan2_1_T2V_480P_Config`: `flow_shift 8.0`, `[1000, 757, 522]`).
* turbowan (rCM): `thu-ml/TurboDiffusion` `turbodiffusion/inference/wan2.1_t2v_infer.py` (`[atan(sigma_max = 80),
  1.5, 1.4, 1.0][:num_steps] + [0]`, t = sin/(cos + sin), x = ε·t₀, the network at 1000·t, x = (1 − t')(x − t·v) +
  t'·ε; `--num_steps` 1 to 4, default 4). Its released checkpoints are trained with sparse (SLA) attention; a
  diffusers copy served here runs dense attention.

`ClipFamily` is checked on construction (a manifest holds one). Every noise draw is a function of (seed, step)
alone (`ClipFamily.noise`), so a clip is the same whatever shares its batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal, get_args

import torch

from fewstep.errors import CheckpointError, shown
from fewstep.models.causal_families import MAX_SHIFT, TRAIN_TIMESTEPS, table_sigmas, table_timesteps
from fewstep.models.schedules import MAX_STEPS, item_noise

Timesteps = Literal["warp", "table", "trigflow"]
"""How a denoising list becomes the network's timesteps and σ (see the module docstring)."""
Update = Literal["euler", "renoise"]
"""The step between denoising steps: `euler` deterministic, `renoise` through x0 with fresh noise."""


@dataclass(frozen=True)
class ClipFamily:
    """How a bidirectional Wan student samples a clip (see the module docstring). Checked on construction."""

    name: str
    source: str
    denoising_steps: tuple[float, ...]
    """The distilled list, decreasing: integers in [1, 1000] (`warp`, `table`), TrigFlow times in (0, π/2)
    (`trigflow`). An n-step clip takes its first n entries."""
    timesteps_rule: Timesteps
    update: Update
    shift: float = 1.0
    """The table's timestep shift (`warp`, `table`): σ = shift·s / (1 + (shift − 1)·s)."""
    step_counts: tuple[int, ...] = field(default=())
    """The step counts served, increasing, each at most the list's length; empty: the list's length alone."""

    def __post_init__(self) -> None:
        for what, text, most in (("name", self.name, 64), ("source", self.source, 1000)):
            if not isinstance(text, str) or not 0 < len(text) <= most:
                raise CheckpointError(f"the clip family's `{what}` must be text of 1 to {most} characters")
        for what, value, kind in (("timesteps_rule", self.timesteps_rule, Timesteps), ("update", self.update, Update)):
            if value not in get_args(kind):
                raise CheckpointError(
                    f"the clip family's `{what}` must be one of {list(get_args(kind))}. Given: {shown(value, 40)}"
                )
        steps = self.denoising_steps
        if not isinstance(steps, tuple) or not 1 <= len(steps) <= MAX_STEPS:
            raise CheckpointError(
                f"the clip family's `denoising_steps` must list 1 to {MAX_STEPS} entries (`MAX_STEPS`). "
                f"Given: {shown(steps, 60)}"
            )
        trig = self.timesteps_rule == "trigflow"
        for d in steps:
            number = not isinstance(d, bool) and isinstance(d, (int, float)) and math.isfinite(d)
            fits = number and (0.0 < d < math.pi / 2 if trig else isinstance(d, int) and 1 <= d <= TRAIN_TIMESTEPS)
            if not fits:
                rule = "TrigFlow times in (0, π/2)" if trig else f"integers from 1 to {TRAIN_TIMESTEPS}"
                raise CheckpointError(f"the clip family's `denoising_steps` must be {rule}. Given: {shown(d, 40)}")
        if any(a <= b for a, b in itertools.pairwise(steps)):
            raise CheckpointError(f"the clip family's `denoising_steps` must decrease. Given: {list(steps)}")
        shift = self.shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0.0 < shift <= MAX_SHIFT:
            raise CheckpointError(
                f"the clip family's `shift` must be a number in (0, {MAX_SHIFT}]. Given: {shown(shift, 40)}"
            )
        counts = self.step_counts
        valid = isinstance(counts, tuple) and all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(steps) for n in counts
        )
        if not valid or any(a >= b for a, b in itertools.pairwise(counts)):
            raise CheckpointError(
                f"the clip family's `step_counts` must be increasing integers from 1 to {len(steps)} (its list's "
                f"length). Given: {shown(counts, 40)}"
            )

    @property
    def served(self) -> tuple[int, ...]:
        """The step counts a clip may take."""
        return self.step_counts or (len(self.denoising_steps),)

    @property
    def default_steps(self) -> int:
        return self.served[-1]

    # -- the schedule ------------------------------------------------------------------------------
    @cached_property
    def _schedule(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(the network's timesteps, σ) over the whole list; an n-step clip takes the first n of each."""
        if self.timesteps_rule == "trigflow":
            sigmas = tuple(math.sin(a) / (math.sin(a) + math.cos(a)) for a in self.denoising_steps)
            return tuple(TRAIN_TIMESTEPS * s for s in sigmas), sigmas
        integral = tuple(int(d) for d in self.denoising_steps)
        timesteps = table_timesteps(integral, self.shift, warp=self.timesteps_rule == "warp")
        return timesteps, table_sigmas(timesteps, self.shift)

    def timesteps(self, steps: int) -> tuple[float, ...]:
        """The network's timestep at each step of a `steps`-step clip."""
        return self._schedule[0][:steps]

    def sigmas(self, steps: int) -> tuple[float, ...]:
        """σ at each step of a `steps`-step clip, and 0 after its last."""
        return (*self._schedule[1][:steps], 0.0)

    # -- sampling ----------------------------------------------------------------------------------
    @staticmethod
    def noise(seed: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal noise of `shape` for step `step` of the clip seeded `seed` (float32): step 0 the clip's
        starting noise, step k > 0 the fresh noise a `renoise` step draws into step k. A function of (seed, step)
        alone."""
        return item_noise(seed, step, tuple(shape))

    def start(self, seed: int, steps: int, shape: Sequence[int]) -> torch.Tensor:
        """A `steps`-step clip's latents before its first step: σ₀·ε₀ (float32)."""
        return self.noise(seed, 0, shape) * self.sigmas(steps)[0]

    def step(
        self, x: torch.Tensor, v: torch.Tensor, steps: Sequence[int], done: Sequence[int], seeds: Sequence[int]
    ) -> torch.Tensor:
        """One step of a batch of clips (B, C, F, h, w), row i a `steps[i]`-step clip of seed `seeds[i]` that has
        taken `done[i]` steps before this one, with flow predictions `v`: each row's latents after the step (its
        clip when this was its last), computed in float64, returned in `x`'s dtype."""
        now, after = [], []
        for n, k in zip(steps, done, strict=True):
            sigmas = self.sigmas(n)
            now.append(sigmas[k])
            after.append(sigmas[k + 1])

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64, device=x.device).view(-1, 1, 1, 1, 1)

        sigma, sigma_next = column(now), column(after)
        x64, v64 = x.double(), v.double()
        if self.update == "euler":
            return (x64 + (sigma_next - sigma) * v64).to(x.dtype)
        x0 = x64 - sigma * v64
        fresh = torch.stack(
            [
                self.noise(seed, k + 1, x.shape[1:]) if s > 0 else torch.zeros(x.shape[1:])
                for seed, k, s in zip(seeds, done, after, strict=True)
            ]
        ).to(x.device, torch.float64)
        return ((1.0 - sigma_next) * x0 + sigma_next * fresh).to(x.dtype)

    # -- the manifest ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["denoising_steps"] = list(self.denoising_steps)
        d["step_counts"] = list(self.step_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipFamily:
        """A family read from a manifest: every field checked (`CheckpointError` when one is not right)."""
        try:
            steps, counts = d["denoising_steps"], d.get("step_counts", [])
            if not isinstance(steps, list) or not isinstance(counts, list):
                raise TypeError("`denoising_steps` and `step_counts` must be lists")
            extra = sorted(set(d) - set(cls.__dataclass_fields__))
            if extra:
                raise TypeError(f"unknown fields {shown(extra, 60)}")
            return cls(**{**d, "denoising_steps": tuple(steps), "step_counts": tuple(counts)})
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"manifest has no valid clip family ({e})") from e


CLIP_FAMILIES: dict[str, ClipFamily] = {
    "wan-lightning": ClipFamily(
        "wan-lightning",
        "ModelTC/LightX2V: lightx2v/models/schedulers/wan/step_distill/scheduler.py, "
        "configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json",
        denoising_steps=(1000, 750, 500, 250),
        timesteps_rule="warp",
        update="euler",
        shift=5.0,
    ),
    "fastwan": ClipFamily(
        "fastwan",
        "hao-ai-lab/FastVideo: fastvideo/pipelines/stages/denoising.py (DmdDenoisingStage), "
        "fastvideo/configs/pipelines/wan.py (FastWan2_1_T2V_480P_Config)",
        denoising_steps=(1000, 757, 522),
        timesteps_rule="table",
        update="renoise",
        shift=8.0,
    ),
    "turbowan": ClipFamily(
        "turbowan",
        "thu-ml/TurboDiffusion: turbodiffusion/inference/wan2.1_t2v_infer.py (rCM, sigma_max 80)",
        denoising_steps=(math.atan(80.0), 1.5, 1.4, 1.0),
        timesteps_rule="trigflow",
        update="renoise",
        step_counts=(1, 2, 3, 4),
    ),
}
"""The bidirectional clip families by name (`fewstep import --family`)."""
CLIP_FAMILIES["rcm"] = CLIP_FAMILIES["turbowan"]


# -- the sampler ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class ClipState:
    """One clip in progress: its latents (C, F, h, w) in float32 (as WanPipeline keeps them, whatever the network's
    dtype), its prompt's embeddings (length, text_dim), its seed, its step count and the steps it has taken."""

    latents: torch.Tensor
    prompt: torch.Tensor
    seed: int
    steps: int
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.steps


class ClipSampler:
    """Steps clips of one family on a diffusers `WanTransformer3DModel`: `begin` makes a clip's state, `advance`
    takes one step for any mix of clips (any step, any step count), one network call per latent shape."""

    def __init__(self, transformer: Any, family: ClipFamily) -> None:
        self.transformer, self.family = transformer, family

    def begin(self, prompt: torch.Tensor, seed: int, steps: int, latent_shape: Sequence[int]) -> ClipState:
        """A clip of `latent_shape` (C, F, h, w) at its first step; `steps` must be one the family serves."""
        if steps not in self.family.served:
            raise ValueError(f"the {self.family.name} family serves {list(self.family.served)} steps. Given: {steps}")
        device = self.transformer.device
        return ClipState(self.family.start(seed, steps, latent_shape).to(device), prompt, seed, steps)

    @torch.no_grad()
    def advance(self, clips: Sequence[ClipState]) -> None:
        """One step for every clip given (none finished): clips of one latent shape in one network call, each row at
        its own timestep; each clip's latents and step count move on."""
        groups: dict[tuple[int, ...], list[ClipState]] = {}
        for clip in clips:
            if clip.finished:
                raise ValueError("a finished clip takes no more steps")
            groups.setdefault(tuple(clip.latents.shape), []).append(clip)
        for group in groups.values():
            x = torch.stack([c.latents for c in group])
            v = self.predict(x, [self.family.timesteps(c.steps)[c.done] for c in group], [c.prompt for c in group])
            after = self.family.step(x, v, [c.steps for c in group], [c.done for c in group], [c.seed for c in group])
            for row, clip in enumerate(group):
                clip.latents, clip.done = after[row], clip.done + 1

    def predict(self, x: torch.Tensor, timesteps: Sequence[float], prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The network's flow prediction for latents `x` (B, C, F, h, w) at per-row `timesteps`, in float32."""
        net = self.transformer
        return net(
            hidden_states=x.to(net.dtype),
            timestep=torch.tensor(timesteps, dtype=torch.float32, device=x.device),
            encoder_hidden_states=torch.stack(list(prompts)).to(net.dtype),
            return_dict=False,
        )[0].float()
