"""Causal video students on Wan 2.1, as data: how each family samples a stream block by block.

A causal student makes a video a block of latent frames at a time. Every family here follows the Self-Forcing
loop (`guandeh17/Self-Forcing`, `pipeline/causal_inference.py`): a block starts from noise; at each step the
network's flow prediction v gives x0 = x − σ·v (in float64), and the next step starts from (1 − σ')·x0 + σ'·ε
with **fresh** noise ε; after the last step the finished block is run once more at the context timestep (0), and
that clean run's keys and values go into the key/value cache the next blocks attend to. Keys are rotated at the
frame's **absolute** position (Wan's RoPE table indexed from the stream's first frame).

What differs between families is data (`CausalFamily`):

* the block size in latent frames;
* the denoising list and how it becomes the network's timesteps: `warp` maps each entry d through the shifted
  table of the sources' `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` with 1000 steps
  (t = table[1000 − d]), or, unwarped, d is the timestep itself; σ of a timestep is the table's σ at the
  nearest table timestep, as the sources look it up (`add_noise`, `_convert_flow_pred_to_x0`);
* the attention span: full causal (a block sees every earlier frame), or a window of `window` latent frames
  counting the block itself and a `sink` of the stream's first frames that are never evicted (a block ending at
  frame e sees frames < S and frames in [e − (window − S), e));
* what a prompt switch does (`PromptSwitch`).

Sources:

* self-forcing: `guandeh17/Self-Forcing` `configs/self_forcing_dmd.yaml` (`denoising_step_list [1000, 750, 500,
  250]`, `warp_denoising_step: true`, `timestep_shift 5.0`, so t = [1000, 937.5, 833.3, 625]; 3 frames a block,
  `context_noise 0`, full causal: `local_attn_size -1`); the sources have no prompt switch: `swap`.
* causvid: `tianweiy/CausVid` `configs/wan_causal_dmd.yaml` (`denoising_step_list [1000, 757, 522, 0]`: the
  trailing 0 is dropped by `causal_inference.py`, so 3 steps; `warp_denoising_step: false`, the wrapper's shift 8,
  so σ = [1, 0.7568, 0.5217]; 3 frames a block; full causal; the clean re-run at `timestep * 0`); no switch: `swap`.
* longlive: `NVlabs/LongLive` 1.0 (commit c484b60) `configs/longlive_inference.yaml` and
  `longlive_interactive_inference.yaml` (the Self-Forcing list, warp, shift 5, 3 frames, `local_attn_size 12`,
  `sink_size 3`, `global_sink: true`, `context_noise 0`); a switch re-encodes the window with the new prompt
  (`pipeline/interactive_causal_inference.py: _recache_after_switch`, `wan/modules/causal_model.py`): see
  `recache_span`.

Rolling Forcing (`TencentARC/RollingForcing`, commit a1477d0: `pipeline/rolling_forcing_inference.py:170-296`,
`wan/modules/causal_model.py:195-300`, `configs/rolling_forcing_dmd.yaml`) samples otherwise (`sampling:
rolling`): a **window** of as many blocks as the list has steps is denoised jointly, in one network call, block b
at step (call − b), so each call starts a new block from noise (step 0), moves every other block of the window one
step on (x0, then fresh noise into its next step), and finishes the oldest (its last step); a stream of N blocks
takes N + steps − 1 calls: the window fills over the first steps − 1 calls (nothing finishes) and drains over the
last (no new block). The blocks of a window attend to each other both ways, per-frame timesteps. After each call
the finished block is run clean at the context timestep and cached (`commit`; the source re-runs the window's
oldest block after every call, and its denoising calls write that block too, but every such write is overwritten
before a call reads it, so the cache holds finished blocks only). Its cache is not rotated by
absolute frame alone (`positions: sink-shifted`): with W = `window` (`max_attention_size`, 21 frames), a call over
q frames from frame s sees the window, the W − q − sink frames cached just before s (fewer near the stream's
start) at their absolute positions, and the sink (the first block) rotated to sit just before those; a call at
s = 0 sees only its window; a clean re-run of the block ending at frame e sees the frames [e − W, e) at absolute
positions, the sink only while it lies in that span. Its list is [1000, 800, 600, 400, 200] warped with shift 5,
3 frames a block, `context_noise 0`; the source has no prompt switch: `swap` (the new prompt from the next call,
for the whole window). A stream shorter than the window is sampled by the same rule (block b at step call − b): the
source's loop re-noises its last block there (`inference_rolling_forcing` assumes at least `steps` blocks).

`CausalFamily` is checked on construction (a manifest will hold one: bounded integers, lists in range).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import torch

from fewstep.errors import CheckpointError, shown
from fewstep.models.sampling import NOISE_STRIDE
from fewstep.models.schedules import MAX_STEPS, item_noise

PromptSwitch = Literal["swap", "recache"]
"""What a new prompt does mid-stream. `swap`: cross-attention takes the new prompt from the next block; the cached
frames keep the keys and values they were encoded with. `recache` (LongLive): before the next block, the frames of
the attention window are encoded again, clean, with the new prompt (`CausalFamily.recache_span`)."""
Positions = Literal["absolute", "sink-shifted"]
"""Where a frame's keys are rotated: `absolute`, at its absolute frame in the stream; `sink-shifted` (Rolling
Forcing), the same for every frame but the sink's, which each denoising call rotates to sit just before the
earliest other frame it sees (`CausalFamily.rolling_history`). Relative re-indexing of the window, as LongLive's
infinite-length variant does, would be another value."""
Sampling = Literal["block", "rolling"]
"""How a stream is denoised: `block`, one block at a time through every step (the Self-Forcing loop); `rolling`, a
window of `steps` blocks at once, block b at step (call − b) (Rolling Forcing)."""
Update = Literal["renoise"]
"""The step between denoising steps: x0 = x − σ·v, then (1 − σ')·x0 + σ'·ε with fresh noise ε."""

TRAIN_TIMESTEPS = 1000
"""The sources' `FlowMatchScheduler(num_train_timesteps=1000)`: denoising lists are in [1, 1000]."""
MAX_BLOCK_FRAMES = 16
"""Most latent frames in a block (the families here use 3; LongLive 2.0 uses 8)."""
MAX_STREAM_FRAMES = 1024
"""Most latent frames in a stream: Wan's RoPE table (`rope_max_seq_len`) has 1024 frame positions."""
MAX_SHIFT = 100.0
"""Largest timestep shift a manifest may give (the families use 5 and 8)."""


def shifted_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sources' scheduler table (σ, timestep) over 1000 steps at `shift`, in float32 as they compute it:
    `s = linspace(1, 0, 1001)[:-1]`, σ = shift·s / (1 + (shift − 1)·s), timestep = 1000·σ."""
    s = torch.linspace(1.0, 0.0, TRAIN_TIMESTEPS + 1)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * TRAIN_TIMESTEPS


def table_timesteps(denoising_steps: Sequence[int], shift: float, warp: bool) -> tuple[float, ...]:
    """The network's timesteps of a denoising list: with `warp`, each entry d read from the shifted table at
    1000 − d (the table with a trailing 0 appended); without, d itself."""
    if not warp:
        return tuple(float(d) for d in denoising_steps)
    table = torch.cat([shifted_table(shift)[1], torch.zeros(1)])
    return tuple(float(table[TRAIN_TIMESTEPS - d]) for d in denoising_steps)


def table_sigmas(timesteps: Sequence[float], shift: float) -> tuple[float, ...]:
    """σ of each timestep: the shifted table's σ at the table timestep nearest to it (the sources' lookup)."""
    sigmas, table = shifted_table(shift)
    return tuple(float(sigmas[int(torch.argmin((table - t).abs()))]) for t in timesteps)


@dataclass(frozen=True)
class CausalFamily:
    """How a causal Wan student samples (see the module docstring). Checked on construction."""

    name: str
    source: str
    block_frames: int
    """Latent frames denoised together (one block)."""
    denoising_steps: tuple[int, ...]
    """The source's `denoising_step_list` without a trailing 0, decreasing, in [1, 1000]."""
    warp: bool
    """Whether each entry is mapped through the shifted table (`warp_denoising_step`), or is the timestep itself."""
    shift: float
    """The scheduler's timestep shift (`timestep_shift`): σ = shift·s / (1 + (shift − 1)·s)."""
    sink: int = 0
    """The stream's first latent frames every block keeps seeing, whatever the window."""
    window: int | None = None
    """Latent frames a block attends to, counting itself and the sink (`local_attn_size`; a rolling family's
    `max_attention_size`: frames a call attends to, its window included); None: full causal."""
    prompt_switch: PromptSwitch = "swap"
    context_timestep: int = 0
    """The timestep of the clean re-run that writes a finished block into the cache (`context_noise`)."""
    positions: Positions = "absolute"
    update: Update = "renoise"
    sampling: Sampling = "block"

    def __post_init__(self) -> None:
        def integer(value: Any, low: int, high: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CheckpointError(
                    f"the causal family's `{what}` must be an integer from {low} to {high}. Given: {shown(value, 40)}"
                )

        for what, text, most in (("name", self.name, 64), ("source", self.source, 1000)):
            if not isinstance(text, str) or not 0 < len(text) <= most:
                raise CheckpointError(f"the causal family's `{what}` must be text of 1 to {most} characters")
        integer(self.block_frames, 1, MAX_BLOCK_FRAMES, "block_frames")
        steps = self.denoising_steps
        if not isinstance(steps, tuple) or not 1 <= len(steps) <= MAX_STEPS:
            raise CheckpointError(
                f"the causal family's `denoising_steps` must list 1 to {MAX_STEPS} timesteps (`MAX_STEPS`). "
                f"Given: {shown(steps, 60)}"
            )
        for d in steps:
            integer(d, 1, TRAIN_TIMESTEPS, "denoising_steps")
        if any(a <= b for a, b in itertools.pairwise(steps)):
            raise CheckpointError(f"the causal family's `denoising_steps` must decrease. Given: {list(steps)}")
        if not isinstance(self.warp, bool):
            raise CheckpointError(f"the causal family's `warp` must be true or false. Given: {shown(self.warp, 40)}")
        shift = self.shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0.0 < shift <= MAX_SHIFT:
            raise CheckpointError(
                f"the causal family's `shift` must be a number in (0, {MAX_SHIFT}]. Given: {shown(shift, 40)}"
            )
        integer(self.sink, 0, MAX_STREAM_FRAMES, "sink")
        if self.window is not None:
            integer(self.window, self.block_frames + self.sink, MAX_STREAM_FRAMES, "window")
        integer(self.context_timestep, 0, TRAIN_TIMESTEPS - 1, "context_timestep")
        for what, value, kind in (
            ("prompt_switch", self.prompt_switch, PromptSwitch),
            ("positions", self.positions, Positions),
            ("update", self.update, Update),
            ("sampling", self.sampling, Sampling),
        ):
            if value not in get_args(kind):
                raise CheckpointError(
                    f"the causal family's `{what}` must be one of {list(get_args(kind))}. Given: {shown(value, 40)}"
                )
        if (self.sampling == "rolling") != (self.positions == "sink-shifted"):
            raise CheckpointError(
                "the causal family's `sampling: rolling` goes with `positions: sink-shifted`, and only it. "
                f"Given: {self.sampling}, {self.positions}"
            )
        if self.sampling == "rolling":
            self._check_rolling()

    def _check_rolling(self) -> None:
        """What the rolling loop needs: its sink is its first block, its attention bound whole blocks that hold the
        full window and the sink, and a prompt switch that is a swap."""
        block, least = self.block_frames, (self.steps + 1) * self.block_frames
        if self.sink != block:
            raise CheckpointError(
                f"a rolling family's `sink` must be its first block ({block} frames). Given: {self.sink}"
            )
        if self.window is None or self.window < least or self.window % block:
            raise CheckpointError(
                f"a rolling family's `window` must be a multiple of its block ({block}) of at least {least} (the "
                f"window of {self.steps} blocks and the sink). Given: {self.window}"
            )
        if self.prompt_switch != "swap":
            raise CheckpointError(f"a rolling family's `prompt_switch` must be `swap`. Given: {self.prompt_switch}")

    # -- the schedule ------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.denoising_steps)

    @cached_property
    def timesteps(self) -> tuple[float, ...]:
        """The network's timestep at each denoising step."""
        return table_timesteps(self.denoising_steps, self.shift, self.warp)

    @cached_property
    def sigmas(self) -> tuple[float, ...]:
        """σ at each denoising step: the table's σ at the timestep nearest to the step's."""
        return table_sigmas(self.timesteps, self.shift)

    # -- the attention span ------------------------------------------------------------------------
    def span(self, max_frames: int) -> int:
        """Latent frames a block attends to in a stream of at most `max_frames` (itself and the sink included)."""
        return max_frames if self.window is None else self.window

    def sees(self, frames: torch.Tensor, end: torch.Tensor, span: int) -> torch.Tensor:
        """Whether a block ending at `end` (exclusive) attends to each of `frames` earlier than its first (tensors
        that broadcast), when a block attends to `span` frames: the sink, and the frames of the window ending at
        `end`."""
        return (frames < self.sink) | (frames >= end - (span - self.sink))

    def recache_span(self, committed: int, max_frames: int) -> tuple[int, int]:
        """The frames [first, committed) a `recache` switch encodes again after `committed` frames of a stream of
        at most `max_frames`, as LongLive 1.0 does with `global_sink` on: while the stream still fits the window, all
        of it, the sink too (first = 0); past it, the window's frames after the sink, whose sink keeps the keys and
        values it had. The re-encoded frames attend to each other both ways (the source's recache runs them
        through the cache path, which applies no mask) and to the kept sink."""
        span = self.span(max_frames)
        if committed <= span:
            return 0, committed
        return committed - (span - self.sink), committed

    # -- the rolling window ------------------------------------------------------------------------
    def rolling_window(self, call: int, blocks: int) -> tuple[int, int]:
        """The blocks [first, last] that call `call` of a `rolling` stream of `blocks` blocks denoises: block b at
        step call − b; `first` finishes in it when call − first is the last step."""
        return max(0, call - self.steps + 1), min(blocks - 1, call)

    def rolling_history(self, first: int, frames: int) -> tuple[int, int]:
        """For a `rolling` denoising call over `frames` frames from frame `first` (> 0): (h, p), where it sees
        the cached frames [h, first) at their absolute positions, and the sink rotated to frames [p, p + sink):
        at most `window − frames − sink` frames before `first`, after the sink, which sits just before them."""
        assert self.window is not None and first > 0
        earlier = min(first - self.sink, self.window - frames - self.sink)
        return first - earlier, first - earlier - self.sink

    # -- sampling ----------------------------------------------------------------------------------
    def noise(self, seed: int, block: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal noise of `shape` for step `step` of block `block` of the stream seeded `seed`: step 0
        is the block's starting noise, step k > 0 the fresh noise that re-noises into step k. A function of
        (seed, block, step) alone, so a stream is the same whatever shares its batches."""
        return item_noise(seed, block * NOISE_STRIDE + step, tuple(shape))

    def step(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        steps: Sequence[int],
        seeds: Sequence[int],
        blocks: Sequence[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One denoising step of a batch of blocks (B, C, F, H, W), row i at its step `steps[i]` of the list, of
        stream `seeds[i]`'s block `blocks[i]`, with flow predictions `v`: the x0 estimates, and per row the state
        of its next step, or None where the row has just taken its last step (x0 is then the block)."""
        sigma = torch.tensor([self.sigmas[k] for k in steps], dtype=torch.float64, device=x.device)
        x0 = (x.double() - sigma.view(-1, 1, 1, 1, 1) * v.double()).to(x.dtype)
        out: list[torch.Tensor | None] = []
        for i, k in enumerate(steps):
            if k + 1 == self.steps:
                out.append(None)
                continue
            nxt = self.sigmas[k + 1]
            fresh = self.noise(seeds[i], blocks[i], k + 1, x.shape[1:]).to(x.device, x.dtype)
            out.append(((1.0 - nxt) * x0[i] + nxt * fresh).to(x.dtype))
        return x0, out

    # -- the manifest ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["denoising_steps"] = list(self.denoising_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CausalFamily:
        """A family read from a manifest: every field checked (`CheckpointError` when one is not right)."""
        try:
            steps = d["denoising_steps"]
            if not isinstance(steps, list):
                raise TypeError("`denoising_steps` is not a list")
            known = {f for f in cls.__dataclass_fields__}
            extra = sorted(set(d) - known)
            if extra:
                raise TypeError(f"unknown fields {shown(extra, 60)}")
            return cls(**{**d, "denoising_steps": tuple(steps)})
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"manifest has no valid causal family ({e})") from e


_SELF_FORCING = (
    "guandeh17/Self-Forcing: configs/self_forcing_dmd.yaml, pipeline/causal_inference.py, utils/wan_wrapper.py"
)

CAUSAL_FAMILIES: dict[str, CausalFamily] = {
    "self-forcing": CausalFamily(
        "self-forcing", _SELF_FORCING, block_frames=3, denoising_steps=(1000, 750, 500, 250), warp=True, shift=5.0
    ),
    "causvid": CausalFamily(
        "causvid",
        "tianweiy/CausVid: configs/wan_causal_dmd.yaml, causvid/models/wan/causal_inference.py, wan_wrapper.py",
        block_frames=3,
        denoising_steps=(1000, 757, 522),
        warp=False,
        shift=8.0,
    ),
    "longlive": CausalFamily(
        "longlive",
        "NVlabs/LongLive 1.0 (c484b60): configs/longlive_interactive_inference.yaml, "
        "pipeline/interactive_causal_inference.py, wan/modules/causal_model.py",
        block_frames=3,
        denoising_steps=(1000, 750, 500, 250),
        warp=True,
        shift=5.0,
        sink=3,
        window=12,
        prompt_switch="recache",
    ),
    "rolling-forcing": CausalFamily(
        "rolling-forcing",
        "TencentARC/RollingForcing (a1477d0): configs/rolling_forcing_dmd.yaml, "
        "pipeline/rolling_forcing_inference.py, wan/modules/causal_model.py",
        block_frames=3,
        denoising_steps=(1000, 800, 600, 400, 200),
        warp=True,
        shift=5.0,
        sink=3,
        window=21,
        positions="sink-shifted",
        sampling="rolling",
    ),
}
