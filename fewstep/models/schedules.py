"""Few-step schedules: which timesteps a student sees for each NFE, and how it moves between them.

A schedule is data. It is saved in the checkpoint's manifest and read back by the engines,
so the step list belongs to the checkpoint, not to the code (DESIGN.md §3).

Parameterisation (flow matching, as the reference models are trained)::

    x_t = (1 - t) * x0 + t * eps,     t in [0, 1], t = 1 is pure noise
    net(x_t, t * timestep_scale, text) = v  ≈  eps - x0
    x0_hat = x_t - t * v

Between steps the student *re-noises* (DMD2 / Self-Forcing): the next state is
``(1 - t_next) * x0_hat + t_next * eps_fresh`` with ``eps_fresh`` drawn from
`item_noise(seed, step)`, so the noise an item sees depends only on its own seed and step
(the determinism contract), never on what else shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fewstep.errors import limit_error

MAX_STEPS = 16
"""Most network evaluations of one few-step recipe (a step count): a manifest is untrusted input, and a long
recipe makes every item, warm-up and gate probe slow. Few-step students serve 1–8."""
MAX_TRAIN_TIMESTEPS = 10_000
"""Largest `num_train_timesteps` of a recipe's scheduler (diffusers' are 1000): schedulers allocate per
training timestep, for every item."""

# splitmix64 constants: a cheap, well-mixed way to turn (seed, step) into a generator seed.
_MASK64 = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) alone: what every noise draw of an item at a step comes from."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ step) & MAX_SEED)
    return g


ENCODE_DRAW = 1 << 20
"""The (seed, step) index of an edit's one extra draw: the noise that samples its image's VAE posterior."""


EditRule = Literal["floor", "flow"]
"""How diffusers' img2img pipelines count the steps a strength keeps (`get_timesteps`): the UNet pipelines keep
`int(steps × strength)` (`floor`); the flow pipelines (FluxImg2ImgPipeline and its kin) start at
`int(steps − steps × strength)`, so they keep the rest (`flow`): 3 steps at 0.7 keep 2 and 3."""


def kept_steps(steps: int, strength: float, rule: EditRule = "floor") -> int:
    """The steps an edit at `strength` keeps of a `steps`-step list (the last ones of it), by `rule`."""
    if rule == "flow":
        return steps - int(max(steps - steps * strength, 0))
    return min(int(steps * strength), steps)


def item_noise(seed: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of `shape` derived only from (seed, step).

    Step 0 is the initial latent; step k > 0 is the fresh noise used to re-noise into step k.
    """
    return torch.randn(shape, generator=step_generator(seed, step), dtype=torch.float32)


@dataclass(frozen=True)
class FewStepSchedule:
    """The student's sampling contract: per-NFE timestep lists and the update rule."""

    timesteps: dict[int, list[float]]
    prediction: str = "flow"
    update: str = "renoise"
    timestep_scale: float = 1000.0
    default_steps: int = 4
    kind: str = "few-step"

    def __post_init__(self) -> None:
        if self.prediction != "flow":
            raise ValueError(f"unsupported prediction type {self.prediction!r}")
        if self.update not in ("renoise", "ode"):
            raise ValueError(f"unsupported update rule {self.update!r}")
        if not 1 <= len(self.timesteps) <= MAX_STEPS or not all(1 <= n <= MAX_STEPS for n in self.timesteps):
            raise ValueError(f"step counts must be between 1 and {MAX_STEPS} (`MAX_STEPS`): {sorted(self.timesteps)}")
        for n, ts in self.timesteps.items():
            if len(ts) != n or any(not 0.0 < t <= 1.0 for t in ts) or ts != sorted(ts, reverse=True):
                raise ValueError(f"timesteps for {n} steps must be {n} decreasing values in (0, 1]: {ts}")
        if self.default_steps not in self.timesteps:
            raise ValueError(f"default_steps {self.default_steps} has no timestep list")

    @property
    def steps(self) -> list[int]:
        """The step counts this schedule serves, ascending."""
        return sorted(self.timesteps)

    def timesteps_for(self, steps: int) -> list[float]:
        """The timestep list for `steps` NFE; InvalidRequest if the checkpoint was not trained for it."""
        if steps not in self.timesteps:
            lo, hi = min(self.timesteps), max(self.timesteps)
            raise limit_error("steps", f"between {lo} and {hi}", steps)
        return self.timesteps[steps]

    @staticmethod
    def to_x0(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 estimate from a flow prediction; `t` broadcasts per item (shape (B,))."""
        return x - t.view(-1, 1, 1, 1) * v

    def next_state(
        self,
        x0: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        fresh: torch.Tensor,
    ) -> torch.Tensor:
        """The state at `t_next` from this step's prediction (re-noise with `fresh`, or ODE)."""
        tn = t_next.view(-1, 1, 1, 1)
        if self.update == "renoise":
            return (1.0 - tn) * x0 + tn * fresh
        return x + (tn - t.view(-1, 1, 1, 1)) * v

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        v: torch.Tensor,
        t_next: Sequence[float | None],
        noise: Callable[[int], torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The one update rule every sampler and engine applies after a network evaluation.

        For a batch of states `x` (B, C, H, W) at per-item times `t` (B,) with predictions `v`: the x0
        estimates (B, C, H, W), and per item its state at `t_next[i]`, or None where the item has just
        finished (`t_next[i]` is None). `noise(i)` is item i's fresh noise for its next step (re-noise
        rule): drawn from the item's own seed and step, so an item's trajectory never depends on what
        shares its batch (the update is elementwise: a batch gives each item the numbers it gets alone).
        """
        x0 = self.to_x0(v, x, t)
        go = [i for i, tn in enumerate(t_next) if tn is not None]
        out: list[torch.Tensor | None] = [None] * len(t_next)
        if go:
            idx = torch.tensor(go)
            tn = torch.tensor([t_next[i] for i in go], dtype=t.dtype)
            fresh = torch.stack([noise(i) for i in go])
            for i, state in zip(go, self.next_state(x0[idx], v[idx], x[idx], t[idx], tn, fresh), strict=True):
                out[i] = state
        return x0, out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "prediction": self.prediction,
            "update": self.update,
            "timestep_scale": self.timestep_scale,
            "default_steps": self.default_steps,
            "timesteps": {str(k): v for k, v in sorted(self.timesteps.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FewStepSchedule:
        return cls(
            timesteps={int(k): [float(t) for t in v] for k, v in d["timesteps"].items()},
            prediction=d.get("prediction", "flow"),
            update=d.get("update", "renoise"),
            timestep_scale=float(d.get("timestep_scale", 1000.0)),
            default_steps=int(d.get("default_steps", 4)),
            kind=d.get("kind", "few-step"),
        )


def default_student_schedule() -> FewStepSchedule:
    """Uniform ("trailing") timesteps for 1–4 NFE, the lists the reference student is trained on."""
    return FewStepSchedule(
        timesteps={
            1: [1.0],
            2: [1.0, 0.5],
            3: [1.0, 2.0 / 3.0, 1.0 / 3.0],
            4: [1.0, 0.75, 0.5, 0.25],
        }
    )


@dataclass(frozen=True)
class TeacherSampler:
    """The teacher's own multi-step sampler: Euler on the flow ODE with classic CFG."""

    steps: int = 25
    guidance: float = 3.0
    timestep_scale: float = 1000.0

    def grid(self) -> list[float]:
        """t values from 1 to 0 (steps + 1 points)."""
        return [1.0 - i / self.steps for i in range(self.steps + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "euler-cfg",
            "steps": self.steps,
            "guidance": self.guidance,
            "timestep_scale": self.timestep_scale,
            "prediction": "flow",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSampler:
        return cls(
            steps=int(d["steps"]), guidance=float(d["guidance"]), timestep_scale=float(d.get("timestep_scale", 1000.0))
        )
