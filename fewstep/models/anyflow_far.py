"""NVIDIA's AnyFlow FAR (a causal any-step student on Wan 2.1) run as sessions, chunk by chunk, several per call.

The loop is diffusers' `AnyFlowFARPipeline` (0.42.1), taken apart so that many streams can share one transformer:

* A clip's latent frames are cut into chunks (`chunk_partition`, the released checkpoints' `[1, 3, 3, 3, 3, 3, 3,
  2]`: 21 latent frames, 81 pixel frames). Chunks are made one after another; chunk k sees chunks 0 … k − 1 through
  the transformer's key/value cache, and itself whole (no causal mask inside a chunk).
* A chunk starts from fresh noise and takes `steps` flow-map steps (any count: 1, 2, 4 …, one checkpoint).
  `FlowMapEulerDiscreteScheduler` gives `steps + 1` sigmas (a linspace from 1 to 0, shifted); step i calls the
  transformer at t = 1000 σ_i with the target r = 1000 σ_{i+1} (its second timestep embedding) and moves
  x ← x − (σ_i − σ_{i+1}) · v, in float64, cast back: deterministic Euler on the mean velocity, with no noise drawn
  after the chunk's first. So the only draw of chunk k is its starting noise, `item_noise(seed, k · NOISE_STRIDE)`
  (step 0 of frame-index k in `models.sampling`'s numbering): a function of (seed, chunk) alone.
* After a chunk (but the last), the cache step: the transformer runs once more (`mode="cache"`, both timesteps 0,
  a chunk-causal flex-attention block mask) on **every** clean latent frame so far, and overwrites the whole cache
  with the keys and values of each layer. The newest `full_chunk_limit − 1` chunks go in at full resolution
  (`patch_size`, 2×2), the older ones through `far_patch_embedding` (`compressed_patch_size`, 4×4: a quarter of
  the tokens). Keys are cached before the rotary embedding, which is applied again at each read.
* Denoising chunk k (`_forward_inference`, no mask) attends to [compressed chunks, full chunks, chunk k].

Cost per chunk grows with its index: the cache step re-encodes the whole history (at most `full_chunk_limit − 1`
chunks at full resolution, every older one compressed), and each denoising step attends to all of it. The
compressed part grows by a quarter of a chunk's tokens per chunk; the full part is bounded. `ChunkPlan` gives
the token counts. A clip is as long as its partition (the model was trained on 21 latent frames, and its rotary
table ends at `rope_max_seq_len` frames): there is no rolling window to stream past it.

`FARRunner` holds no stream state; a `FARSession` holds all of one stream's: its prompt embeddings, its seed and
step count, its chunk and step, the chunk in progress, its clean latents so far (the next cache step re-reads them
all) and its cache. The transformer takes the cache as an argument (one dict of per-layer tensors per call, nothing
kept on the modules), so sessions share calls by stacking rows. `step(sessions)` is one step boundary: every
session given takes one denoising step of its current chunk, each at its own timesteps; sessions at the same chunk
of the same partition prefix, latent size and prompt length go through one transformer call (their caches hold
the same number of tokens: the denoising path takes no mask, so caches of different lengths cannot share a call).
Sessions that finished a chunk then get their cache step, batched the same way. A session's rows of a batched
call are its own computation: its latents equal `AnyFlowFARPipeline`'s for the same prompt, seed and steps
(tests/models/test_anyflow_far.py), whatever shares its calls.

Classifier-free guidance is the pipeline's (rows [negative, positive], `uncond + g (cond − uncond)`); the
released checkpoints have it distilled in (`guidance_scale=1`, one row). Video conditioning (`video_latents`,
I2V / V2V) is not taken.

diffusers' flex-attention processor runs without `torch.compile`: flex attention's eager path materialises the
score matrix (a warning says so), fine on CPU for tiny models. The denoising path passes no mask and zero-pads
queries, keys and values to a multiple of 128 tokens; the padded keys (zeros) are then attended to with score 0
(value 0), which only shrinks the output. That is the pipeline's arithmetic, kept here as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fewstep.errors import CheckpointError, shown
from fewstep.models.causal_families import MAX_STREAM_FRAMES
from fewstep.models.sampling import NOISE_STRIDE
from fewstep.models.schedules import MAX_STEPS, item_noise

FAR_FAMILY: Literal["anyflow-far"] = "anyflow-far"
"""The family name a FAR student's manifest carries (its `causal.name`)."""
FAR_PIPELINES = ("AnyFlowFARPipeline",)
FAR_SOURCE = (
    "diffusers 0.42.1 AnyFlowFARPipeline: pipelines/anyflow/pipeline_anyflow_far.py (NVIDIA AnyFlow, PR #13745)"
)
DEFAULT_STEPS = 4
"""The step count AnyFlowFARPipeline's own example samples the released checkpoints at."""
SERVED_STEPS = tuple(range(1, 9))
"""Step counts served by default: the flow map is one checkpoint for any count; the model card shows 1 to 8."""
MAX_CHUNKS = 256
MAX_CHUNK_FRAMES = 64

KVLayers = dict[int, dict[str, torch.Tensor]]
"""The transformer's cache argument: per layer, `full_cache` and `compressed_cache`, each (2: keys and values,
rows, heads, tokens, head_dim)."""


@dataclass(frozen=True)
class ChunkPlan:
    """Where each chunk's context sits, as `AnyFlowFARTransformer3DModel` places it, in tokens."""

    partition: tuple[int, ...]
    full_chunk_limit: int
    full_per_frame: int
    """Tokens of a full-resolution latent frame: (h / 2)(w / 2) for 2×2 patches."""
    compressed_per_frame: int
    """Tokens of a compressed latent frame: (h / 4)(w / 4) for 4×4 patches."""

    @classmethod
    def of(cls, config: Any, partition: Sequence[int], height: int, width: int) -> ChunkPlan:
        """The plan of a transformer (its `config`) for a partition at a latent size (height, width)."""
        patch, compressed = config.patch_size, config.compressed_patch_size
        return cls(
            partition=tuple(int(n) for n in partition),
            full_chunk_limit=int(config.full_chunk_limit),
            full_per_frame=(height // patch[1]) * (width // patch[2]),
            compressed_per_frame=(height // compressed[1]) * (width // compressed[2]),
        )

    def start(self, chunk: int) -> int:
        """The first latent frame of `chunk`."""
        return sum(self.partition[:chunk])

    def compressed_chunks(self, chunk: int) -> int:
        """How many of the chunks before `chunk` it sees compressed: all but the newest `full_chunk_limit − 1`."""
        return max(0, chunk + 1 - self.full_chunk_limit)

    def cached_tokens(self, chunk: int) -> tuple[int, int]:
        """(compressed, full) cached tokens a denoising step of `chunk` attends to, besides its own."""
        compressed = self.compressed_chunks(chunk)
        return (
            self.start(compressed) * self.compressed_per_frame,
            (self.start(chunk) - self.start(compressed)) * self.full_per_frame,
        )

    def chunk_tokens(self, chunk: int) -> int:
        """Tokens of `chunk` itself (its queries in each denoising step)."""
        return self.partition[chunk] * self.full_per_frame

    def cache_values(self, layers: int, heads: int, head_dim: int) -> int:
        """Values one row's cache holds at its largest, keys and values of every layer (a transformer of `layers`
        blocks of `heads` heads of `head_dim`)."""
        tokens = max((sum(self.cached_tokens(k)) for k in range(1, len(self.partition))), default=0)
        return 2 * layers * heads * head_dim * tokens


@dataclass(frozen=True)
class FARFamily:
    """How a FAR student is served, as its manifest's `causal` section holds it (checked on construction: a
    manifest is untrusted): the chunk partition (its sum is the stream's bound in latent frames), how many chunks
    a chunk sees at full resolution (itself included), and the step counts served with the default one."""

    chunk_partition: tuple[int, ...]
    full_chunk_limit: int
    step_counts: tuple[int, ...]
    default_steps: int
    name: Literal["anyflow-far"] = FAR_FAMILY
    source: str = FAR_SOURCE

    def __post_init__(self) -> None:
        def integers(values: Any, low: int, high: int, what: str) -> None:
            if (
                not isinstance(values, tuple)
                or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values)
            ):
                raise CheckpointError(
                    f"the FAR family's `{what}` must list integers from {low} to {high}. Given: {shown(values, 60)}"
                )

        if self.name != FAR_FAMILY:
            raise CheckpointError(f"the FAR family's `name` must be {FAR_FAMILY!r}. Given: {shown(self.name, 40)}")
        if not isinstance(self.source, str) or not 0 < len(self.source) <= 1000:
            raise CheckpointError("the FAR family's `source` must be text of 1 to 1000 characters")
        integers(self.chunk_partition, 1, MAX_CHUNK_FRAMES, "chunk_partition")
        if len(self.chunk_partition) > MAX_CHUNKS or sum(self.chunk_partition) > MAX_STREAM_FRAMES:
            raise CheckpointError(
                f"the FAR family's `chunk_partition` must be at most {MAX_CHUNKS} chunks of at most "
                f"{MAX_STREAM_FRAMES} latent frames in all. Given: {len(self.chunk_partition)} chunks, "
                f"{sum(self.chunk_partition)} frames"
            )
        integers((self.full_chunk_limit,), 1, MAX_CHUNKS, "full_chunk_limit")
        integers(self.step_counts, 1, MAX_STEPS, "step_counts")
        if list(self.step_counts) != sorted(set(self.step_counts)):
            raise CheckpointError(f"the FAR family's `step_counts` must ascend. Given: {list(self.step_counts)}")
        if self.default_steps not in self.step_counts:
            raise CheckpointError(
                f"the FAR family's `default_steps` must be one of {list(self.step_counts)}. "
                f"Given: {shown(self.default_steps, 40)}"
            )

    @property
    def max_frames(self) -> int:
        """The stream's bound in latent frames: the partition's."""
        return sum(self.chunk_partition)

    def chunks_for(self, latent_frames: int) -> tuple[int, ...]:
        """The partition's first chunks that cover `latent_frames` latent frames (1 to `max_frames`)."""
        covered = 0
        for k, frames in enumerate(self.chunk_partition):
            covered += frames
            if covered >= latent_frames:
                return self.chunk_partition[: k + 1]
        return self.chunk_partition

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "chunk_partition": list(self.chunk_partition),
            "full_chunk_limit": self.full_chunk_limit,
            "step_counts": list(self.step_counts),
            "default_steps": self.default_steps,
        }

    @classmethod
    def from_dict(cls, d: Any) -> FARFamily:
        """The family of a manifest's `causal` section: CheckpointError naming what is wrong."""
        if not isinstance(d, dict):
            raise CheckpointError("manifest has no FAR family")
        extra = sorted(set(d) - set(cls.__dataclass_fields__))
        if extra:
            raise CheckpointError(f"the FAR family has unknown fields {shown(extra, 60)}")
        try:
            lists = {k: d[k] for k in ("chunk_partition", "step_counts")}
            if not all(isinstance(v, list) for v in lists.values()):
                raise TypeError("`chunk_partition` and `step_counts` must be lists")
            return cls(**{**d, **{k: tuple(v) for k, v in lists.items()}})
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"manifest has no valid FAR family ({e})") from e


@dataclass(eq=False)
class _CacheRows:
    """A session's rows of the cache written by one batched cache step (`rows` rows from `first`)."""

    layers: KVLayers
    first: int
    rows: int

    def view(self) -> KVLayers:
        end = self.first + self.rows
        return {i: {k: t[:, self.first : end] for k, t in kv.items()} for i, kv in self.layers.items()}


@dataclass(eq=False)
class FARSession:
    """One stream's whole state. Made by `FARRunner.start`; advanced by `FARRunner.step` only."""

    embeds: torch.Tensor
    """(rows, tokens, text_dim): [negative, positive] with guidance, [positive] without."""
    seed: int
    sigmas: tuple[float, ...]
    """The step count's `steps + 1` sigmas (float64 values): 1 to 0, shifted."""
    guidance_scale: float
    plan: ChunkPlan
    height: int
    width: int
    chunk: int = 0
    step: int = 0
    latents: torch.Tensor | None = None
    """The chunk in progress (1, frames, C, h, w), FAR's layout; None between chunks."""
    clean: list[torch.Tensor] = field(default_factory=list)
    """The finished chunks (1, frames, C, h, w), in order."""
    cache: _CacheRows | None = None
    next_embeds: torch.Tensor | None = None
    """A new prompt (shaped as `embeds`), taken when the chunk in progress finishes: its cache step and every chunk
    after it run with it (`FARRunner.switch`)."""

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]

    @property
    def done(self) -> bool:
        """Every chunk of the partition is finished."""
        return self.chunk >= len(self.plan.partition)

    def video(self) -> torch.Tensor:
        """The finished chunks' latents (1, C, frames, h, w): what `AnyFlowFARPipeline` returns with
        `output_type="latent"`, once the session is done."""
        return torch.cat(self.clean, dim=1).permute(0, 2, 1, 3, 4)


def chunk_noise(seed: int, chunk: int, frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The starting noise of a session's chunk `chunk` (1, frames, C, h, w), float32 on the CPU: a function of
    (seed, chunk) alone. The flow-map sampler draws nothing else."""
    return item_noise(seed, chunk * NOISE_STRIDE, (frames, channels, height, width))[None]


def clip_noise(seed: int, partition: Sequence[int], channels: int, height: int, width: int) -> torch.Tensor:
    """Every chunk's starting noise as one clip (1, C, frames, h, w): the `latents` that make `AnyFlowFARPipeline`
    start each chunk where a session of this seed does."""
    draws = [chunk_noise(seed, k, n, channels, height, width) for k, n in enumerate(partition)]
    return torch.cat(draws, dim=1).permute(0, 2, 1, 3, 4)


class FARRunner:
    """Advances `FARSession`s on one `AnyFlowFARTransformer3DModel`, with the sigmas of its pipeline's scheduler.

    Called from one driver thread. Holds no session state beyond a table of sigmas per step count."""

    def __init__(self, transformer: Any, scheduler: Any) -> None:
        """`transformer` and `scheduler` as `AnyFlowFARPipeline` holds them (`pipe.transformer`,
        `pipe.scheduler`); the scheduler is only read (a copy of it computes each step count's sigmas)."""
        self.transformer = transformer
        self._scheduler = type(scheduler).from_config(scheduler.config)
        self._sigmas: dict[int, tuple[float, ...]] = {}
        cfg = transformer.config
        self.channels = int(cfg.in_channels)
        self.layers = int(cfg.num_layers)

    @property
    def device(self) -> torch.device:
        return torch.device(self.transformer.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def sigmas(self, steps: int) -> tuple[float, ...]:
        """The scheduler's `steps + 1` sigmas for `steps` steps (its `set_timesteps(steps)`)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1. Given: {steps}")
        if steps not in self._sigmas:
            self._scheduler.set_timesteps(steps, device="cpu")
            self._sigmas[steps] = tuple(float(s) for s in self._scheduler.sigmas.double())
        return self._sigmas[steps]

    def start(
        self,
        prompt_embeds: torch.Tensor,
        seed: int,
        steps: int,
        height: int,
        width: int,
        chunk_partition: Sequence[int] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> FARSession:
        """A new session: `prompt_embeds` (1, tokens, text_dim) as `AnyFlowFARPipeline.encode_prompt` gives them,
        latent `height` × `width`, the transformer's own `chunk_partition` unless one is given. With
        `guidance_scale` > 1 (the pipeline's rule), `negative_prompt_embeds` of the same shape are required."""
        cfg = self.transformer.config
        partition = tuple(int(n) for n in (chunk_partition or cfg.chunk_partition))
        if not partition or min(partition) < 1:
            raise ValueError(f"chunk_partition must be positive frame counts. Given: {partition}")
        if sum(partition) > cfg.rope_max_seq_len:
            raise ValueError(f"the clip's latent frames must be <= {cfg.rope_max_seq_len}. Given: {sum(partition)}")
        patch = cfg.patch_size
        if height % patch[1] or width % patch[2]:
            raise ValueError(f"the latent size must be a multiple of {tuple(patch[1:])}. Given: {(height, width)}")
        if max(height // patch[1], width // patch[2]) > cfg.rope_max_seq_len:
            raise ValueError(
                f"the latent size must be <= {cfg.rope_max_seq_len} patches a side. Given: {(height, width)}"
            )
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must be (1, tokens, dim). Given: {tuple(prompt_embeds.shape)}")
        embeds = prompt_embeds
        if guidance_scale > 1.0:
            if negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError("guidance_scale > 1 needs negative_prompt_embeds shaped as prompt_embeds")
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return FARSession(
            embeds=embeds.detach().to(self.device, self.dtype),
            seed=seed,
            sigmas=self.sigmas(steps),
            guidance_scale=guidance_scale,
            plan=ChunkPlan.of(cfg, partition, height, width),
            height=height,
            width=width,
        )

    def switch(
        self, session: FARSession, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None
    ) -> None:
        """A new prompt for `session` from the end of its chunk in progress (or of the next chunk it starts, between
        chunks) on: that chunk keeps its prompt; the cache step after it, which encodes every clean frame again,
        and every later chunk take the new one, so the history the next chunk attends to is encoded under the prompt
        it is made with. (`AnyFlowFARPipeline` has no prompt switch: new `prompt_embeds` from its step-end callback
        reach its cache steps only, its denoising calls keep the embeddings made before its loop.) A later switch
        before then replaces it. Embeddings as `start` takes them (the negative ones where the session has
        guidance)."""
        embeds = prompt_embeds
        if session.rows == 2:
            if negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError("a session with guidance needs negative_prompt_embeds shaped as prompt_embeds")
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        if embeds.shape != session.embeds.shape:
            raise ValueError(
                f"the new prompt's embeddings must be shaped as the session's {tuple(session.embeds.shape)}. "
                f"Given: {tuple(embeds.shape)}"
            )
        session.next_embeds = embeds.detach().to(self.device, self.dtype)

    @torch.no_grad()
    def step(self, sessions: Sequence[FARSession]) -> list[torch.Tensor | None]:
        """One step boundary: each session (not done; each given once) takes one denoising step of its chunk.
        Returns, per session, the chunk's clean latents (1, C, frames, h, w) if it finished its chunk with this
        step (its cache step done: the session is ready for its next chunk), else None."""
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("each session may be given once per step")
        for s in sessions:
            if s.done:
                raise ValueError("a session that is done cannot step")
            if s.latents is None:
                frames = s.plan.partition[s.chunk]
                noise = chunk_noise(s.seed, s.chunk, frames, self.channels, s.height, s.width)
                s.latents = noise.to(self.device, self.dtype)
        for group in _groups(sessions):
            self._denoise(group)
        finished: list[torch.Tensor | None] = [None] * len(sessions)
        to_cache = []
        for i, s in enumerate(sessions):
            if s.step + 1 < len(s.sigmas) - 1:
                s.step += 1
                continue
            assert s.latents is not None
            if s.next_embeds is not None:
                s.embeds, s.next_embeds = s.next_embeds, None
            s.clean.append(s.latents)
            finished[i] = s.latents.permute(0, 2, 1, 3, 4)
            s.latents, s.step = None, 0
            s.chunk += 1
            if s.done:
                s.cache = None
            else:
                to_cache.append(s)
        for group in _groups(to_cache, cached=True):
            self._encode_cache(group)
        return finished

    def _denoise(self, group: list[FARSession]) -> None:
        """One transformer call for sessions at one chunk: each row at its session's (t, r), then each session's
        Euler step (skipped where t = r, as the pipeline skips it)."""
        first = group[0]
        chunk, plan = first.chunk, first.plan
        moving = [s for s in group if s.sigmas[s.step] != s.sigmas[s.step + 1]]
        if not moving:
            return
        hidden, t_rows, r_rows = [], [], []
        for s in moving:
            assert s.latents is not None
            hidden.append(s.latents.expand(s.rows, -1, -1, -1, -1))
            t_rows += [s.sigmas[s.step] * 1000.0] * s.rows
            r_rows += [s.sigmas[s.step + 1] * 1000.0] * s.rows
        frames = plan.partition[chunk]
        # Timesteps as the pipeline passes them: float64 (the scheduler's), one per latent frame of the chunk.
        t = torch.tensor(t_rows, dtype=torch.float64, device=self.device)[:, None].repeat(1, frames)
        r = torch.tensor(r_rows, dtype=torch.float64, device=self.device)[:, None].repeat(1, frames)
        rows = len(t_rows)
        velocity, _ = self.transformer(
            hidden_states=torch.cat(hidden),
            timestep=t,
            r_timestep=r,
            encoder_hidden_states=torch.cat([s.embeds for s in moving]),
            chunk_partition=list(plan.partition[: chunk + 1]),
            kv_cache=self._gathered(moving, rows),
            kv_cache_flag={"num_cached_chunks": chunk, "is_cache_step": False},
            return_dict=False,
        )
        at = 0
        for s in moving:
            v = velocity[at : at + s.rows]
            at += s.rows
            if s.rows == 2:
                uncond, cond = v.chunk(2)
                v = uncond + s.guidance_scale * (cond - uncond)
            assert s.latents is not None
            # The scheduler's arithmetic: float64 sigmas promote the update, which is cast back to v's dtype.
            delta = s.sigmas[s.step] - s.sigmas[s.step + 1]
            s.latents = (s.latents.double() - delta * v.double()).to(v.dtype)

    def _gathered(self, group: list[FARSession], rows: int) -> KVLayers:
        """The group's caches as one cache argument, rows in the group's order; the written buffer itself when
        the group is exactly the rows of one earlier cache step (no copy)."""
        caches = [s.cache for s in group]
        if all(c is None for c in caches):
            cfg = self.transformer.config
            shape = (2, rows, cfg.num_attention_heads, 0, cfg.attention_head_dim)
            empty = torch.zeros(shape, device=self.device, dtype=self.dtype)
            return {i: {"full_cache": empty, "compressed_cache": empty} for i in range(self.layers)}
        held = [c for c in caches if c is not None]
        if len(held) < len(caches):
            raise RuntimeError("sessions at one chunk must all have a cache or none")
        buffer = held[0].layers
        firsts = [sum(c.rows for c in held[:i]) for i in range(len(held))]
        if (
            all(c.layers is buffer for c in held)
            and [c.first for c in held] == firsts
            and buffer[0]["full_cache"].shape[1] == rows
        ):
            return buffer
        views = [c.view() for c in held]
        return {
            i: {k: torch.cat([v[i][k] for v in views], dim=1) for k in ("full_cache", "compressed_cache")}
            for i in range(self.layers)
        }

    def _encode_cache(self, group: list[FARSession]) -> None:
        """The pipeline's `encode_kv_cache` for sessions that just finished chunk k (the same k): every clean
        frame so far through the transformer at timesteps 0 under the chunk-causal mask, into a new buffer whose
        rows the sessions then hold."""
        cfg = self.transformer.config
        first = group[0]
        plan, done = first.plan, first.chunk - 1
        prefix = list(plan.partition[: done + 1])
        latents = torch.cat([torch.cat(s.clean, dim=1).expand(s.rows, -1, -1, -1, -1) for s in group])
        rows, frames = latents.shape[0], latents.shape[1]
        compressed, full = plan.cached_tokens(done + 1)

        def buffer(tokens: int) -> torch.Tensor:
            shape = (2, rows, cfg.num_attention_heads, tokens, cfg.attention_head_dim)
            return torch.zeros(shape, device=self.device, dtype=self.dtype)

        layers = {i: {"full_cache": buffer(full), "compressed_cache": buffer(compressed)} for i in range(self.layers)}
        # Integer zeros, as the pipeline passes them (its `torch.tensor([0])`).
        zeros = torch.zeros(rows, frames, dtype=torch.long, device=self.device)
        mask = self.transformer.build_attention_mask(
            chunk_partition=prefix, height=first.height, width=first.width, device=self.device, mode="cache"
        )
        self.transformer(
            hidden_states=latents,
            timestep=zeros,
            r_timestep=zeros,
            encoder_hidden_states=torch.cat([s.embeds for s in group]),
            chunk_partition=prefix,
            attention_mask=mask,
            kv_cache=layers,
            kv_cache_flag={"num_cached_chunks": done, "is_cache_step": True},
            return_dict=False,
        )
        at = 0
        for s in group:
            s.cache = _CacheRows(layers, at, s.rows)
            at += s.rows


def _groups(sessions: Sequence[FARSession], cached: bool = False) -> list[list[FARSession]]:
    """Sessions that can share a transformer call: the same chunks behind them and ahead (the chunk in progress,
    or none for the cache step of sessions that just finished one), latent size and prompt length. In the order
    given."""
    groups: dict[tuple[Any, ...], list[FARSession]] = {}
    for s in sessions:
        chunks = s.plan.partition[: s.chunk + (0 if cached else 1)]
        key = (chunks, s.plan.full_chunk_limit, s.height, s.width, s.embeds.shape[1:])
        groups.setdefault(key, []).append(s)
    return list(groups.values())
