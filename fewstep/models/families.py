"""Few-step families of users' diffusers students, as data: how each one samples.

A family fixes what its model card (or paper) says a student of that family must be sampled with: the
diffusers scheduler and its settings, the timesteps for each step count it was distilled for, extra
arguments of the scheduler's step (TCD's `eta`), and how guidance works: `none` (distilled in: no
`guidance_scale`, no `negative_prompt`), `embedded` (a guidance-scale embedding the UNet takes:
`guidance_scale` within a range, no `negative_prompt`), or `cfg` (classic classifier-free guidance, two
evaluations per step: `guidance_scale` within a range and `negative_prompt`).

`fewstep import` resolves a family against the pipeline's own scheduler config into a `Recipe` and writes
it into the registry version's manifest: the engine reads the recipe, never this table. Sources:

* turbo: stabilityai/sd-turbo and stabilityai/sdxl-turbo model cards (guidance 0, 1–4 steps; SDXL-Turbo
  ships `EulerAncestralDiscreteScheduler`, trailing spacing);
* lightning: ByteDance/SDXL-Lightning model card (`EulerDiscreteScheduler` with trailing spacing, guidance 0,
  the step count the checkpoint was distilled for; the 1-step UNet predicts the sample);
* lcm: SimianLuo/LCM_Dreamshaper_v7 and latent-consistency/lcm-lora-* model cards, and diffusers'
  LCM pipeline (`LCMScheduler`, 1–8 steps, 4 recommended; a UNet with `time_cond_proj_dim` takes the
  guidance as an embedding of w − 1, a LoRA-merged one uses classic CFG in [1, 2]);
* tcd: h1t/TCD-SDXL-LoRA usage (`TCDScheduler`, guidance 0, `eta` 0.3, 4 steps);
* dmd2: tianweiy/DMD2 model card (`LCMScheduler` with timesteps [999, 749, 499, 249] for the 4-step UNet,
  [399] for the 1-step one, guidance 0);
* hyper-sd: ByteDance/Hyper-SD model card (`DDIMScheduler` with trailing spacing, guidance 0, the step count
  of the N-step checkpoint);
* flux-schnell: black-forest-labs/FLUX.1-schnell model card and diffusers' `FluxPipeline` (`FlowMatchEulerDiscrete
  Scheduler`, shift 1, no dynamic shifting, sigmas `linspace(1, 1/N, N)`, 1–4 steps, 4 recommended, guidance 0,
  T5 prompts of at most 256 tokens);
* sd35-turbo: stabilityai/stable-diffusion-3.5-large-turbo model card and diffusers' `StableDiffusion3Pipeline`
  (`FlowMatchEulerDiscreteScheduler` as the pipeline ships it, spaced by its own `set_timesteps(N)`, 4 steps,
  guidance 0, T5 prompts of 256 tokens: the pipeline's default);
* z-image-turbo: Tongyi-MAI/Z-Image-Turbo model card and diffusers' `ZImagePipeline` (`FlowMatchEulerDiscrete
  Scheduler`, shift 3, no dynamic shifting, sigmas `linspace(1, 1/N, N)`, guidance 0, 8 NFEs: the card's
  `num_inference_steps=9` predates diffusers' dropping of the pipeline's zero-length last step, and is 8 steps
  now; Qwen3 prompts of 512 tokens).
* flux2-klein: black-forest-labs/FLUX.2-klein-4B and FLUX.2-klein-9B model cards and diffusers'
  `Flux2KleinPipeline` with `is_distilled` (`FlowMatchEulerDiscreteScheduler` as shipped, dynamic shifting by
  `compute_empirical_mu` of the image's sequence length and the step count, sigmas `linspace(1, 1/N, N)`,
  4 steps, no guidance, Qwen3 prompts of 512 tokens).
* qwen-image-lightning: ModelTC/Qwen-Image-Lightning README and its `generate_with_diffusers.py`, and diffusers'
  `QwenImagePipeline` (a LoRA over Qwen/Qwen-Image, fused at import: `FlowMatchEulerDiscreteScheduler` with the
  README's config, exponential dynamic shifting with base = max shift = log 3 ("we use shift=3 in distillation"),
  so the pipeline's `calculate_shift` gives mu = log 3 at every size; sigmas `linspace(1, 1/N, N)`; 4 or 8 steps,
  each LoRA file distilled for one; `true_cfg_scale=1.0`: no guidance; the pipeline's default
  `max_sequence_length` of 512 prompt tokens).
* sana-sprint: Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers model card, diffusers' `SanaSprintPipeline`
  and NVlabs/Sana's SANA-Sprint demo (`SCMScheduler`, TrigFlow angles from `max_timesteps` 1.5708 down to 0, the
  2-step list through `intermediate_timesteps` 1.3, 1–4 steps, 2 by default, the guidance embedding at 1–30,
  4.5 by default, 300 prompt tokens).

A family is for one kind of architecture (`models.architectures`): `unet` families for the SD/SDXL UNets,
`flow` families (flow matching: the scheduler walks sigmas, timesteps are sigma × 1000) for the transformers,
`trigflow` ones (TrigFlow: timesteps are angles in radians, from π/2, pure noise, to 0; the sampler's latents are
the VAE's times the scheduler's `sigma_data`, and the image is the last step's x0 estimate) for SANA-Sprint.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np

from fewstep.errors import CheckpointError
from fewstep.models import lazy
from fewstep.models.architectures import SamplingKind, architecture
from fewstep.models.schedules import MAX_STEPS, MAX_TRAIN_TIMESTEPS, EditRule

GuidanceMode = Literal["none", "embedded", "cfg"]
SigmaRule = Literal["linspace", "scheduler"]
"""How a flow family's pipeline spaces a step count's sigmas: FluxPipeline's `linspace(1, 1/N, N)`, given to the
scheduler (`linspace`), or the scheduler's own spacing (`scheduler`: StableDiffusion3Pipeline calls
`set_timesteps(N)`, which spaces them from the scheduler's largest sigma to its smallest, then shifts them)."""
SIGMA_RULES: tuple[SigmaRule, ...] = ("linspace", "scheduler")
TRIGFLOW_TOP = 1.5708
"""The largest TrigFlow timestep a recipe may hold: π/2 (pure noise) as the SCM pipelines round it (`max_timesteps`)."""


@dataclass(frozen=True)
class Guidance:
    """How a family takes guidance. `low`–`high` bound `guidance_scale`; `default` is used when a request gives
    none."""

    mode: GuidanceMode
    low: float = 0.0
    high: float = 0.0
    default: float = 0.0


@dataclass(frozen=True)
class Family:
    """A family's sampling rules before they meet a pipeline (see the module docstring)."""

    name: str
    source: str
    scheduler: str
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] = (1, 2, 3, 4)
    """Step counts served; the scheduler's own timesteps for each, unless `timesteps` names them."""
    default_steps: int = 4
    timesteps: dict[int, list[int]] = field(default_factory=dict)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    guidance: Guidance = Guidance("none")
    cfg_guidance: Guidance | None = None
    """For a family whose UNets may lack the guidance embedding (an LCM-LoRA merged into a base): classic CFG."""
    one_step_prediction: str | None = None
    """`prediction_type` of the family's 1-step checkpoints when it differs (SDXL-Lightning's predicts x0)."""
    step_count_is_the_checkpoints: bool = False
    """A checkpoint is distilled for one step count: `--steps` picks which (default `default_steps`)."""
    kind: SamplingKind = "unet"
    """Its sampling math (`Architecture.schedulers`): the DDPM-era schedulers' timesteps, flow's sigmas or TrigFlow's
    angles."""
    architectures: tuple[str, ...] = ()
    """The architectures (`models.architectures`) its students are, where a family is distilled from one base
    (the transformers'); empty: any architecture its `kind` samples (the UNet families: SD and SDXL alike)."""

    def fits(self, arch: str) -> bool:
        return arch in self.architectures if self.architectures else architecture(arch).schedulers == self.kind

    mu: dict[str, Any] | None = None
    """Flow families whose scheduler shifts dynamically: how `mu` follows the image's sequence length and the step
    count (`mu_of`): `{"rule": "constant", "value": v}`, `{"rule": "linear", "base_seq", "max_seq",
    "base_shift", "max_shift"}` (FluxPipeline's `calculate_shift`) or `{"rule": "flux2-empirical"}`."""
    max_sequence_length: int | None = None
    """Tokens of the T5-style prompt encoding (the pipeline's `max_sequence_length`), where there is one."""
    sigma_rule: SigmaRule = "linspace"
    """Flow families: how its pipeline spaces the sigmas (`SigmaRule`)."""
    max_timesteps: float | None = None
    """TrigFlow families: the first timestep (radians), as the pipeline sets its scheduler (`max_timesteps`)."""
    intermediate_timesteps: float | None = None
    """TrigFlow families: the 2-step list's second timestep (`intermediate_timesteps`); the other lists are spaced
    evenly down to 0."""


QWEN_IMAGE_LIGHTNING = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""The scheduler config the Qwen-Image-Lightning README gives diffusers' `FlowMatchEulerDiscreteScheduler`."""

FAMILIES: dict[str, Family] = {
    "turbo": Family(
        "turbo",
        "stabilityai/sd-turbo and stabilityai/sdxl-turbo model cards",
        "EulerAncestralDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        default_steps=1,
    ),
    "lightning": Family(
        "lightning",
        "ByteDance/SDXL-Lightning model card",
        "EulerDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        steps=(1, 2, 4, 8),
        default_steps=4,
        one_step_prediction="sample",
        step_count_is_the_checkpoints=True,
    ),
    "lcm": Family(
        "lcm",
        "SimianLuo/LCM_Dreamshaper_v7 and latent-consistency/lcm-lora model cards; diffusers' LCM pipeline",
        "LCMScheduler",
        steps=(1, 2, 3, 4, 5, 6, 7, 8),
        default_steps=4,
        guidance=Guidance("embedded", 1.0, 15.0, 8.0),
        cfg_guidance=Guidance("cfg", 1.0, 2.0, 1.0),
    ),
    "tcd": Family(
        "tcd",
        "h1t/TCD-SDXL-LoRA usage (diffusers' TCD guide)",
        "TCDScheduler",
        steps=(1, 2, 3, 4, 5, 6, 7, 8),
        default_steps=4,
        step_kwargs={"eta": 0.3},
    ),
    "dmd2": Family(
        "dmd2",
        "tianweiy/DMD2 model card",
        "LCMScheduler",
        steps=(1, 4),
        default_steps=4,
        timesteps={1: [399], 4: [999, 749, 499, 249]},
        step_count_is_the_checkpoints=True,
    ),
    "hyper-sd": Family(
        "hyper-sd",
        "ByteDance/Hyper-SD model card (the N-step checkpoints)",
        "DDIMScheduler",
        {"timestep_spacing": "trailing"},
        steps=(1, 2, 4, 8),
        default_steps=4,
        step_kwargs={"eta": 0.0},
        step_count_is_the_checkpoints=True,
    ),
    "flux-schnell": Family(
        "flux-schnell",
        "black-forest-labs/FLUX.1-schnell model card; diffusers' FluxPipeline",
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 1.0, "use_dynamic_shifting": False},
        steps=(1, 2, 3, 4),
        default_steps=4,
        kind="flow",
        architectures=("flux",),
        max_sequence_length=256,
    ),
    "sd35-turbo": Family(
        "sd35-turbo",
        "stabilityai/stable-diffusion-3.5-large-turbo model card; diffusers' StableDiffusion3Pipeline",
        "FlowMatchEulerDiscreteScheduler",
        steps=(1, 2, 3, 4),
        default_steps=4,
        kind="flow",
        architectures=("sd3",),
        max_sequence_length=256,
        sigma_rule="scheduler",
    ),
    "z-image-turbo": Family(
        "z-image-turbo",
        "Tongyi-MAI/Z-Image-Turbo model card; diffusers' ZImagePipeline",
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "use_dynamic_shifting": False},
        steps=(1, 2, 3, 4, 5, 6, 7, 8),
        default_steps=8,
        kind="flow",
        architectures=("zimage",),
        max_sequence_length=512,
    ),
    "flux2-klein": Family(
        "flux2-klein",
        "black-forest-labs/FLUX.2-klein-4B and -9B model cards; diffusers' Flux2KleinPipeline (is_distilled)",
        "FlowMatchEulerDiscreteScheduler",
        steps=(1, 2, 3, 4),
        default_steps=4,
        kind="flow",
        architectures=("flux2",),
        mu={"rule": "flux2-empirical"},
        max_sequence_length=512,
    ),
    "qwen-image-lightning": Family(
        "qwen-image-lightning",
        "ModelTC/Qwen-Image-Lightning README (generate_with_diffusers.py); diffusers' QwenImagePipeline",
        "FlowMatchEulerDiscreteScheduler",
        QWEN_IMAGE_LIGHTNING,
        steps=(4, 8),
        default_steps=8,
        step_count_is_the_checkpoints=True,
        kind="flow",
        architectures=("qwenimage",),
        # QwenImagePipeline's calculate_shift over the config's sequence lengths and shifts (equal: mu = log 3).
        mu={
            "rule": "linear",
            "base_seq": QWEN_IMAGE_LIGHTNING["base_image_seq_len"],
            "max_seq": QWEN_IMAGE_LIGHTNING["max_image_seq_len"],
            "base_shift": QWEN_IMAGE_LIGHTNING["base_shift"],
            "max_shift": QWEN_IMAGE_LIGHTNING["max_shift"],
        },
        max_sequence_length=512,
    ),
    "sana-sprint": Family(
        "sana-sprint",
        "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers model card; diffusers' SanaSprintPipeline; "
        "NVlabs/Sana's SANA-Sprint demo (guidance 1–30)",
        "SCMScheduler",
        {"prediction_type": "trigflow", "sigma_data": 0.5},
        steps=(1, 2, 3, 4),
        default_steps=2,
        guidance=Guidance("embedded", 1.0, 30.0, 4.5),
        kind="trigflow",
        architectures=("sana",),
        max_sequence_length=300,
        max_timesteps=TRIGFLOW_TOP,
        intermediate_timesteps=1.3,
    ),
}


@dataclass(frozen=True)
class Recipe:
    """A family resolved against one pipeline: what the engine runs, kept in the manifest."""

    family: str
    source: str
    scheduler: str
    scheduler_config: dict[str, Any]
    timesteps: dict[int, list[int]]
    default_steps: int
    guidance: Guidance
    step_kwargs: dict[str, Any]
    custom_timesteps: bool
    """Whether the timesteps are given to the scheduler (`set_timesteps(timesteps=…)`) or are its own."""
    sigmas: dict[int, list[float]] = field(default_factory=dict)
    """Flow families: the sigmas each step count is set with, before the scheduler's shift (`set_timesteps`);
    `timesteps` are then the scheduler's sigma × 1000, not integers."""
    max_sequence_length: int | None = None
    mu: dict[str, Any] | None = None
    """The family's `mu` rule (`Family.mu`); then `timesteps` are those of the native size, and each image's are
    set for its own sequence length (`mu_of`)."""
    sigma_rule: SigmaRule = "linspace"
    """Flow families: how the pipeline spaces `sigmas` (`SigmaRule`; `set_timesteps`)."""
    kind: SamplingKind = "unet"
    """The family's sampling math (`Family.kind`). TrigFlow's `timesteps` are the angles the scheduler is set with
    (`set_timesteps(timesteps=…)`, the final 0 added)."""

    def __post_init__(self) -> None:
        """Bounds (`schedules.MAX_STEPS`, `MAX_TRAIN_TIMESTEPS`): a recipe is read from untrusted manifests."""
        if self.kind not in get_args(SamplingKind) or bool(self.sigmas) != (self.kind == "flow"):
            raise CheckpointError(
                f"the recipe's kind must be one of {get_args(SamplingKind)}, with sigmas for flow only. Given: "
                f"{str(self.kind)[:20]}"
            )
        trained = self.scheduler_config.get("num_train_timesteps", 1000)
        if not isinstance(trained, int) or not 1 <= trained <= MAX_TRAIN_TIMESTEPS:
            raise CheckpointError(
                f"the recipe's `num_train_timesteps` must be an integer from 1 to {MAX_TRAIN_TIMESTEPS}. Given: "
                f"{str(trained)[:40]}"
            )
        if not self.timesteps or len(self.timesteps) > MAX_STEPS:
            raise CheckpointError(f"the recipe must serve 1 to {MAX_STEPS} step counts. Given: {len(self.timesteps)}")
        top = trained + 1 if self.sigmas else trained  # a flow list starts at sigma 1: t = num_train_timesteps
        trig = self.kind == "trigflow"
        bounds = f"(0, {TRIGFLOW_TOP}] radians, decreasing" if trig else f"[0, {top})"
        for n, ts in self.timesteps.items():
            inside = (
                all(0.0 < t <= TRIGFLOW_TOP for t in ts) and ts == sorted(ts, reverse=True)
                if trig
                else all(0 <= t < top for t in ts)
            )
            if not 1 <= n <= MAX_STEPS or len(ts) != n or not inside:
                raise CheckpointError(
                    f"the recipe's {str(n)[:12]}-step list must be {str(n)[:12]} timesteps in {bounds}, with at "
                    f"most {MAX_STEPS} steps (`MAX_STEPS`). Given: {len(ts)} timesteps"
                )
        sigma = self.scheduler_config.get("sigma_data", 0.5)
        if trig and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0.0 < sigma < float("inf")):
            raise CheckpointError(f"the recipe's `sigma_data` must be a positive number. Given: {str(sigma)[:40]}")
        for n, sig in self.sigmas.items():
            if n not in self.timesteps or len(sig) != n or not all(0.0 < x <= 1.0 for x in sig):
                raise CheckpointError(f"the recipe's {str(n)[:12]}-step sigmas must be {str(n)[:12]} values in (0, 1]")
        if self.sigma_rule not in SIGMA_RULES:
            raise CheckpointError(
                f"the recipe's `sigma_rule` must be one of {list(SIGMA_RULES)}. Given: {str(self.sigma_rule)[:40]}"
            )
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 1024:
            raise CheckpointError(
                f"the recipe's `max_sequence_length` must be 1 to 1024. Given: {self.max_sequence_length}"
            )
        if self.mu is not None:
            mu_of(self.mu, 4096, self.default_steps)  # a manifest's rule is checked before any image needs it
        if self.default_steps not in self.timesteps:
            raise CheckpointError(f"the recipe's default steps {self.default_steps} have no timestep list")

    @property
    def steps(self) -> list[int]:
        return sorted(self.timesteps)

    def set_timesteps(self, scheduler: Any, steps: int, mu: float | None = None, device: Any = None) -> None:
        """`scheduler` (one of the recipe's) set for `steps` steps as the family's pipeline sets it (`mu`: a
        dynamically shifting scheduler's, for this image)."""
        if steps in self.sigmas:
            set_flow_timesteps(scheduler, self.sigma_rule, self.sigmas[steps], mu, device)
        elif self.kind == "trigflow":  # the angles given, and the 0 the last step goes to
            ts = [*self.timesteps[steps], 0.0]
            scheduler.set_timesteps(steps, timesteps=ts, device=device, max_timesteps=None, intermediate_timesteps=None)
        elif self.custom_timesteps:
            scheduler.set_timesteps(timesteps=self.timesteps[steps], device=device)
        else:
            scheduler.set_timesteps(steps, device=device)

    @property
    def latent_scale(self) -> float:
        """The sampler's latents are the VAE's (scaled) latents times this: TrigFlow's `sigma_data` (its scheduler
        walks noise of that deviation, and its denoiser takes latents divided by it); 1 otherwise."""
        return float(self.scheduler_config.get("sigma_data", 0.5)) if self.kind == "trigflow" else 1.0

    @property
    def ends_on_estimate(self) -> bool:
        """Whether the image is the last step's x0 estimate (the SCM pipeline decodes `denoised`), not the sample
        the last step goes on to."""
        return self.kind == "trigflow"

    @property
    def edit_rule(self) -> EditRule:
        """How its img2img pipeline counts the steps a strength keeps: the flow pipelines' way for flow families."""
        return "flow" if self.sigmas else "floor"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = {str(k): v for k, v in sorted(self.timesteps.items())}
        d["sigmas"] = {str(k): v for k, v in sorted(self.sigmas.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        try:
            sigmas = dict(d.get("sigmas") or {})
            kind = str(d.get("kind") or ("flow" if sigmas else "unet"))  # manifests before `kind`: unet or flow
            return cls(
                family=str(d["family"]),
                source=str(d["source"]),
                scheduler=str(d["scheduler"]),
                scheduler_config=dict(d["scheduler_config"]),
                timesteps={int(k): [_time(t, kind != "unet") for t in v] for k, v in d["timesteps"].items()},
                default_steps=int(d["default_steps"]),
                guidance=Guidance(**d["guidance"]),
                step_kwargs=dict(d.get("step_kwargs") or {}),
                custom_timesteps=bool(d["custom_timesteps"]),
                sigmas={int(k): [float(x) for x in v] for k, v in sigmas.items()},
                max_sequence_length=None if d.get("max_sequence_length") is None else int(d["max_sequence_length"]),
                mu=None if d.get("mu") is None else dict(d["mu"]),
                sigma_rule=d.get("sigma_rule", "linspace"),
                kind=cast(SamplingKind, kind),  # checked in __post_init__
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"manifest has no valid recipe ({e})") from e


def _time(t: Any, real: bool) -> Any:
    """A recipe's timestep: an integer (the DDPM-era schedulers'), or a float (flow's sigma × 1000, TrigFlow's
    angle)."""
    return float(t) if real else int(t)


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class called `name` (only the ones the families use)."""
    allowed = {f.scheduler for f in FAMILIES.values()}
    if name not in allowed:
        raise CheckpointError(f"scheduler {name!r} is not one the families use ({sorted(allowed)})")
    return lazy.attr("diffusers", name)


def resolve(
    family: str,
    shipped_config: dict[str, Any],
    embeds_guidance: bool,
    steps: list[int] | None = None,
    arch: str = "sd",
    native_tokens: int = 4096,
) -> Recipe:
    """`family`'s recipe for a pipeline whose scheduler config is `shipped_config`, whose denoiser does (or does
    not) take a guidance embedding, and whose architecture is `arch`. `steps`: the step counts to serve (default
    the family's; a family whose checkpoints are distilled for one step count serves only `default_steps` unless
    told otherwise). `native_tokens`: the native image's sequence length (the recipe's timesteps are for it)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    f = FAMILIES[family]
    if not f.fits(arch):
        fits = sorted(n for n, g in FAMILIES.items() if g.fits(arch))
        raise CheckpointError(f"family {family!r} does not sample {arch} pipelines; choose from {fits}")
    wanted = steps or ([f.default_steps] if f.step_count_is_the_checkpoints else list(f.steps))
    bad = [n for n in wanted if n not in f.steps]
    if bad:
        raise CheckpointError(f"family {family!r} serves {list(f.steps)} steps, not {bad}")
    cls = scheduler_class(f.scheduler)
    # Only the settings this scheduler takes: the shipped config is often another scheduler's.
    accepted = set(inspect.signature(cls.__init__).parameters)
    base = {k: v for k, v in shipped_config.items() if k in accepted}
    overrides = dict(f.overrides)
    if f.one_step_prediction and wanted == [1]:
        overrides["prediction_type"] = f.one_step_prediction
    scheduler = cls.from_config({**base, **overrides})
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    custom = all(n in f.timesteps for n in wanted) or f.kind == "trigflow"
    timesteps: dict[int, list[Any]] = {}
    sigmas: dict[int, list[float]] = {}
    if f.kind == "flow" and f.mu is None and config.get("use_dynamic_shifting"):
        raise CheckpointError(
            f"the pipeline's scheduler shifts dynamically (`use_dynamic_shifting`); family {family!r} samples with a "
            f"static shift"
        )
    for n in wanted:
        if f.kind == "trigflow":  # the pipeline's own call: the list ends at 0, where no step is taken
            two = f.intermediate_timesteps if n == 2 else None
            scheduler.set_timesteps(n, max_timesteps=f.max_timesteps, intermediate_timesteps=two)
            timesteps[n] = [float(t) for t in scheduler.timesteps[:-1]]
            continue
        if f.kind == "flow":
            sigmas[n] = flow_sigmas(n, f.sigma_rule, scheduler)
            mu = None if f.mu is None else mu_of(f.mu, native_tokens, n)
            set_flow_timesteps(scheduler, f.sigma_rule, sigmas[n], mu)
            timesteps[n] = [float(t) for t in scheduler.timesteps]
            continue
        if custom:
            scheduler.set_timesteps(timesteps=f.timesteps[n])
        else:
            scheduler.set_timesteps(n)
        timesteps[n] = [int(t) for t in scheduler.timesteps]
    default = f.default_steps if f.default_steps in wanted else wanted[0]
    guidance = f.guidance if embeds_guidance or f.cfg_guidance is None else f.cfg_guidance
    if f.guidance.mode == "embedded" and not embeds_guidance and f.cfg_guidance is None:
        raise CheckpointError(
            f"family {family!r} needs a denoiser with a guidance embedding (`time_cond_proj_dim`, `guidance_embeds`)"
        )
    if f.kind == "flow" and embeds_guidance and f.guidance.mode == "none":
        raise CheckpointError(f"family {family!r} is guidance-free; this transformer embeds guidance (a dev model?)")
    return Recipe(
        f.name, f.source, f.scheduler, config, timesteps, default, guidance, dict(f.step_kwargs), custom, sigmas,
        f.max_sequence_length, None if f.mu is None else dict(f.mu), f.sigma_rule, f.kind,
    )  # fmt: skip


def flow_sigmas(steps: int, rule: SigmaRule = "linspace", scheduler: Any = None) -> list[float]:
    """The sigmas a flow pipeline sets for `steps` steps, before the scheduler's shift: FluxPipeline's
    `np.linspace(1.0, 1 / N, N)` (`linspace`), or the spacing `scheduler`'s own `set_timesteps(N)` computes, from
    its largest sigma to its smallest (`scheduler`)."""
    if rule == "scheduler":
        trained = scheduler.config.num_train_timesteps
        spaced = np.linspace(scheduler.sigma_max * trained, scheduler.sigma_min * trained, steps) / trained
        return [float(x) for x in spaced]
    return [float(x) for x in np.linspace(1.0, 1.0 / steps, steps)]


def set_flow_timesteps(
    scheduler: Any, rule: SigmaRule, sigmas: list[float], mu: float | None = None, device: Any = None
) -> None:
    """A flow `scheduler` set to walk `sigmas` (`flow_sigmas`) as the family's pipeline sets it: given to it
    (`linspace`), or left to its own `set_timesteps(N)` (`scheduler`), which computes the same sigmas in float64
    before its shift; given ones would be rounded to float32 first, and its timesteps would differ from the
    pipeline's by a float32 step."""
    if rule == "scheduler":
        scheduler.set_timesteps(len(sigmas), mu=mu, device=device)
    else:
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)


def mu_of(rule: dict[str, Any], tokens: int, steps: int) -> float:
    """`mu` for an image of `tokens` sequence length sampled in `steps` steps, by the family's rule; CheckpointError
    for a rule that is not one of these (a manifest is untrusted)."""
    kind = rule.get("rule")
    try:
        if kind == "constant":
            return float(rule["value"])
        if kind == "linear":  # FluxPipeline's calculate_shift
            lo, hi = float(rule["base_seq"]), float(rule["max_seq"])
            m = (float(rule["max_shift"]) - float(rule["base_shift"])) / (hi - lo)
            return tokens * m + float(rule["base_shift"]) - m * lo
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"the recipe's `mu` rule is not valid ({type(e).__name__})") from e
    if kind == "flux2-empirical":  # Flux2KleinPipeline's compute_empirical_mu
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        if tokens > 4300:
            return a2 * tokens + b2
        m200, m10 = a2 * tokens + b2, a1 * tokens + b1
        a = (m200 - m10) / 190.0
        return a * steps + (m200 - 200.0 * a)
    raise CheckpointError(f"unknown `mu` rule {str(kind)[:40]!r}; known: constant, linear, flux2-empirical")


def detect(
    shipped_config: dict[str, Any], embeds_guidance: bool, arch: str = "sd", index: dict[str, Any] | None = None
) -> str:
    """The family a pipeline's own scheduler config, its denoiser and its `model_index.json` (`index`) say it
    is; CheckpointError listing the families when they cannot tell (then `--family` must say)."""
    cls = shipped_config.get("_class_name")
    dynamic = shipped_config.get("use_dynamic_shifting")
    if arch == "flux2" and (index or {}).get("is_distilled") is True and not embeds_guidance:
        return "flux2-klein"  # the pipeline's own flag: a base klein says false (and samples ~50 steps with CFG)
    if arch == "flux" and cls == "FlowMatchEulerDiscreteScheduler" and not dynamic and not embeds_guidance:
        return "flux-schnell"  # schnell: no shifting, no guidance embedding (dev has both)
    if (
        arch == "zimage"
        and cls == "FlowMatchEulerDiscreteScheduler"
        and not dynamic
        and shipped_config.get("shift") == 3
    ):
        return "z-image-turbo"  # the turbo's own shift; the undistilled Z-Image ships 6 (and is sampled with CFG)
    if arch == "sana" and cls == "SCMScheduler":
        return "sana-sprint"  # the sCM students ship this scheduler; SANA's base pipelines, flow ones
    if cls == "TCDScheduler":
        return "tcd"
    if cls == "LCMScheduler" and embeds_guidance:
        return "lcm"
    if cls == "EulerAncestralDiscreteScheduler" and shipped_config.get("timestep_spacing") == "trailing":
        return "turbo"
    raise CheckpointError(
        f"cannot tell the family from the pipeline's scheduler ({cls}"
        f"{', trailing' if shipped_config.get('timestep_spacing') == 'trailing' else ''}): "
        f"pass `--family` with one of {sorted(n for n, f in FAMILIES.items() if f.fits(arch))}"
    )
