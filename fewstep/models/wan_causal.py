"""Causal Wan students served from a key/value cache: a block-causal runner around diffusers' `WanTransformer3DModel`.

`CausalWan` wraps a loaded `WanTransformer3DModel` and runs its own modules (patch embedding, condition embedder,
blocks, output norm and projection) block by block, as the causal students were trained to run
(`models.causal_families`). It owns a **preallocated** cache: per layer, keys and values of shape
(slots, positions × tokens per frame, heads, head dim), one slot per session, allocated once and never resized.
A slot holds the sink's frames (the stream's first `sink`) and a ring of the latest frames after them, as many as
the next block can see (`span − block − sink`); which absolute frame each position holds is kept per slot
(`frame_of`), so eviction is a write over the oldest frame, never a copy. Keys are stored rotated at their
frame's absolute position.

The calls an engine makes, each for a batch of sessions in one network call:

* `denoise(slots, x, t, prompts, starts)`: the flow prediction for each row's block (starting at latent frame
  `starts[i]`, at timestep `t[i]`), attending to its slot's cached frames that its family lets it see and to the
  whole block itself. Reads the cache, never writes it, so a block takes any number of steps.
* `commit(slots, x0, prompts, starts)`: the clean re-run of each row's finished block at the family's context
  timestep; its keys and values go into the row's slot (the sink kept, the oldest other frames evicted).
* `recache(slot, clean, prompt)`: a `recache` family's prompt switch (`CausalFamily.recache_span`).
* `reset(slot)`: a new session in that slot.

`advance(states)` is one step boundary on top of them: every session given takes one denoising step of its block
(`CausalFamily.step`: x0, then fresh noise drawn from (seed, block, step)), and those that finished their block are
committed in one more batched call. Rows may be at different blocks and different steps.

`ReferenceStream` is the same computation with no cache: every call runs the model once over every frame the
block depends on, each frame as the computation that encoded it saw it, under an explicit attention mask.
`tests/models/test_wan_causal.py` checks that a cached stream equals it.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` with a boolean mask (the cached path's
rows see different numbers of frames). The runner installs its own attention processors on the model's blocks;
given the model's usual arguments they hand over to the processors they replaced, so the model still runs its
own `forward`. Not thread-safe: one driver thread calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.errors import CheckpointError
from fewstep.models.causal_families import MAX_STREAM_FRAMES, CausalFamily

MAX_SLOTS = 256
"""Most sessions one runner's cache holds (each slot is gigabytes at Wan2.1-1.3B sizes)."""


def rope_at(rope: Any, frames: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables (cos, sin), each (B, F·h·w, 1, head_dim), of the tokens of latent frames `frames` (B, F),
    given by their absolute position in the stream, on an h × w grid of patches: `WanRotaryPosEmbed`'s own
    buffers, its frame part indexed by each frame's position where its `forward` indexes frames from 0."""
    h, w = grid
    b, f = frames.shape
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        in_time, in_height, in_width = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        parts = [
            in_time[frames.to(table.device)].view(b, f, 1, 1, -1).expand(b, f, h, w, -1),
            in_height[:h].view(1, 1, h, 1, -1).expand(b, f, h, w, -1),
            in_width[:w].view(1, 1, 1, w, -1).expand(b, f, h, w, -1),
        ]
        out.append(torch.cat(parts, dim=-1).reshape(b, f * h * w, 1, -1))
    return out[0], out[1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` (B, N, heads, head_dim) rotated by tables `cos`, `sin` (B, N, 1, head_dim), as `WanAttnProcessor` does."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@dataclass
class PromptKV:
    """A prompt's cross-attention keys and values in every layer, (layers, B, text_tokens, heads, head_dim):
    computed once per prompt (`CausalWan.prompt`) and given with every call of the session until it changes."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def take(self, rows: Sequence[int]) -> PromptKV:
        index = torch.tensor(list(rows), device=self.k.device)
        return PromptKV(self.k[:, index], self.v[:, index])

    @staticmethod
    def cat(parts: Sequence[PromptKV]) -> PromptKV:
        return PromptKV(torch.cat([p.k for p in parts], dim=1), torch.cat([p.v for p in parts], dim=1))


@dataclass
class _Cross:
    """What the cross-attention of one call attends to: P prompts per row, (layers, B, P, text_tokens, heads,
    head_dim), and which one each token takes (B, N) (None: P is 1)."""

    k: torch.Tensor
    v: torch.Tensor
    pick: torch.Tensor | None = None


@dataclass
class _Self:
    """What the self-attention of one call attends to. Queries and keys of the call's own tokens are rotated by
    `cos`, `sin`; with `slots`, each row's keys are its slot's cached keys followed by its own tokens. `mask`
    (B, 1, 1 or N, keys) says which keys each query sees. With `write_dst`, the own keys and values at flat token
    indices `write_src` go to flat cache indices `write_dst` (slot × positions) after the attention. With
    `cache_cos`, `cache_sin` (B, positions × tokens, 1, head_dim), the cache holds keys un-rotated: each row's
    cached keys are rotated by them at the read, and the own keys are written un-rotated (`models.wan_rolling`)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    cache: tuple[torch.Tensor, torch.Tensor] | None = None
    slots: torch.Tensor | None = None
    write_src: torch.Tensor | None = None
    write_dst: torch.Tensor | None = None
    cache_cos: torch.Tensor | None = None
    cache_sin: torch.Tensor | None = None


def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (attn.heads, -1))


class _Processor:
    """The attention processor of layer `layer` while a runner drives the model: its own attention when the block
    hands it the runner's context (`_Self`, `_Cross`), the processor it replaced for the model's own calls."""

    def __init__(self, layer: int, replaced: Any) -> None:
        self.layer, self.replaced = layer, replaced

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        context = self.context(encoder_hidden_states, rotary_emb)
        if context is None:
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = _heads(attn, attn.norm_q(attn.to_q(hidden_states)))
        out = self.attend(attn, hidden_states, q, context).transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def context(self, encoder_hidden_states: Any, rotary_emb: Any) -> Any:
        raise NotImplementedError

    def attend(self, attn: Any, hidden_states: torch.Tensor, q: torch.Tensor, context: Any) -> torch.Tensor:
        """The attention output (B, heads, N, head_dim) of queries `q` (B, N, heads, head_dim)."""
        raise NotImplementedError


class _SelfAttention(_Processor):
    """`attn1`: over the cache and the block, as `_Self` says (the blocks hand `rotary_emb` to it untouched)."""

    def context(self, encoder_hidden_states: Any, rotary_emb: Any) -> Any:
        return rotary_emb if isinstance(rotary_emb, _Self) else None

    def attend(self, attn: Any, hidden_states: torch.Tensor, q: torch.Tensor, context: Any) -> torch.Tensor:
        plan: _Self = context
        q = _rotate(q, plan.cos, plan.sin)
        plain = _heads(attn, attn.norm_k(attn.to_k(hidden_states)))
        k = _rotate(plain, plan.cos, plan.sin)
        v = _heads(attn, attn.to_v(hidden_states))
        keys, values = k, v
        if plan.cache is not None and plan.slots is not None:
            cache_k, cache_v = plan.cache[0][self.layer], plan.cache[1][self.layer]
            cached = cache_k[plan.slots]
            if plan.cache_cos is not None and plan.cache_sin is not None:
                cached = _rotate(cached, plan.cache_cos, plan.cache_sin)
            keys = torch.cat([cached, k], dim=1)
            values = torch.cat([cache_v[plan.slots], v], dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=plan.mask
        )
        if plan.cache is not None and plan.write_dst is not None and plan.write_src is not None:
            heads, dim = k.shape[2:]
            stored = plain if plan.cache_cos is not None else k
            for cache, new in zip(plan.cache, (stored, v), strict=True):
                cache[self.layer].view(-1, heads, dim).index_copy_(
                    0, plan.write_dst, new.reshape(-1, heads, dim)[plan.write_src]
                )
        return out


class _CrossAttention(_Processor):
    """`attn2`: over cached prompt keys and values (`_Cross`, handed to it as `encoder_hidden_states`)."""

    def context(self, encoder_hidden_states: Any, rotary_emb: Any) -> Any:
        return encoder_hidden_states if isinstance(encoder_hidden_states, _Cross) else None

    def attend(self, attn: Any, hidden_states: torch.Tensor, q: torch.Tensor, context: Any) -> torch.Tensor:
        cross: _Cross = context
        q = q.transpose(1, 2)
        k, v = cross.k[self.layer].transpose(2, 3), cross.v[self.layer].transpose(2, 3)
        outs = [F.scaled_dot_product_attention(q, k[:, p], v[:, p]) for p in range(k.shape[1])]
        out = outs[0]
        if cross.pick is not None:  # the reference's tokens each take the prompt their frame was encoded with
            pick = cross.pick[:, None, :, None]
            for p in range(1, len(outs)):
                out = torch.where(pick == p, outs[p], out)
        return out


@dataclass(eq=False)
class BlockState:
    """One session's block in progress, as `CausalWan.advance` takes it and moves it on."""

    slot: int
    start: int
    """The block's first latent frame."""
    seed: int
    prompt: PromptKV
    """The session's prompt (one row)."""
    x: torch.Tensor
    """The block's state at its current step (C, block_frames, h, w)."""
    step: int = 0


class CausalWan:
    """A loaded `WanTransformer3DModel` run block-causally over a preallocated key/value cache (see the module
    docstring). `max_frames` bounds every session's stream in latent frames (the full-causal families' cache
    holds that many); `latent` is the latent frame's (height, width)."""

    def __init__(self, model: Any, family: CausalFamily, slots: int, max_frames: int, latent: tuple[int, int]) -> None:
        config = model.config
        if config.image_dim is not None or config.added_kv_proj_dim is not None:
            raise CheckpointError("image-conditioned Wan transformers (I2V) are not supported by the causal runner")
        patch = tuple(config.patch_size)
        if patch[0] != 1:
            raise CheckpointError(f"the causal runner needs one latent frame per patch in time. Given: {patch}")
        if any(getattr(b.attn1, "fused_projections", False) for b in model.blocks):
            raise CheckpointError("the causal runner needs the attention projections unfused")
        limit = min(MAX_STREAM_FRAMES, int(config.rope_max_seq_len))
        if not family.block_frames <= max_frames <= limit:
            raise ValueError(
                f"max_frames must be from {family.block_frames} to {limit} (the RoPE table). Given: {max_frames}"
            )
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be from 1 to {MAX_SLOTS}. Given: {slots}")
        height, width = latent
        if height < 1 or width < 1 or height % patch[1] or width % patch[2]:
            raise ValueError(f"the latent size must be positive multiples of the patch {patch[1:]}. Given: {latent}")
        self.model, self.family, self.max_frames, self.latent = model, family, max_frames, (height, width)
        self.grid = (height // patch[1], width // patch[2])
        self.tokens = self.grid[0] * self.grid[1]
        self.span = family.span(max_frames)
        self.positions = self._held_frames()
        """Frames a slot holds: the sink, then the ring."""
        self.ring = self.positions - family.sink
        if self.ring < 0:
            raise ValueError(f"a stream of {max_frames} frames leaves no room for the sink of {family.sink}")
        weight = model.patch_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        shape = (config.num_layers, slots, self.positions * self.tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.frame_of = torch.full((slots, self.positions), -1, dtype=torch.long)
        """The absolute frame each position of each slot holds (-1: none)."""
        self.committed = [0] * slots
        """Frames written into each slot: its next block's first frame."""
        for i, block in enumerate(model.blocks):  # a second runner on the model keeps the first's processors
            if not isinstance(block.attn1.processor, _Processor):
                block.attn1.set_processor(_SelfAttention(i, block.attn1.processor))
                block.attn2.set_processor(_CrossAttention(i, block.attn2.processor))

    def _held_frames(self) -> int:
        """Frames a slot holds: the most a block sees before its own."""
        return self.span - self.family.block_frames

    @property
    def slots(self) -> int:
        return len(self.committed)

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """A block's latents: (channels, block_frames, height, width)."""
        return (int(self.model.config.in_channels), self.family.block_frames, *self.latent)

    @property
    def cache_bytes(self) -> int:
        """Memory of the key/value cache (every slot)."""
        return 2 * self.k.numel() * self.k.element_size()

    # -- the calls ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt(self, text: torch.Tensor) -> PromptKV:
        """The cross-attention keys and values of prompt embeddings `text` (B, text_tokens, text_dim), as the
        pipeline's text encoder gives them, in every layer."""
        encoded = self.model.condition_embedder.text_embedder(text.to(self.device, self.dtype))
        ks, vs = [], []
        for block in self.model.blocks:
            attn = block.attn2
            ks.append(_heads(attn, attn.norm_k(attn.to_k(encoded))))
            vs.append(_heads(attn, attn.to_v(encoded)))
        return PromptKV(torch.stack(ks), torch.stack(vs))

    @torch.inference_mode()
    def denoise(
        self,
        slots: Sequence[int],
        x: torch.Tensor,
        t: torch.Tensor | Sequence[float],
        prompts: PromptKV,
        starts: Sequence[int],
    ) -> torch.Tensor:
        """Flow predictions (B, C, F, h, w) of blocks `x` (B, C, F, h, w), row i the block starting at latent frame
        `starts[i]` of the session in slot `slots[i]` (its next block: `committed[slot]`), at timestep `t[i]`
        ((B,), or (B, F) per frame), with prompt row i of `prompts`. Writes nothing."""
        self._check(slots, x, prompts, starts)
        return self._forward(x, self._timesteps(t, x), self._cross(prompts), self._reading(slots, starts))

    @torch.inference_mode()
    def commit(self, slots: Sequence[int], x0: torch.Tensor, prompts: PromptKV, starts: Sequence[int]) -> None:
        """Write finished blocks `x0` (B, C, F, h, w) into their sessions' slots (arguments as `denoise`): the clean
        re-run at the family's context timestep, whose keys and values each layer stores; each slot's next block
        then starts `block_frames` later."""
        self._check(slots, x0, prompts, starts)
        t = torch.full((len(slots),), float(self.family.context_timestep), device=self.device)
        stored = [self._stored(f, f + self.family.block_frames, True) for f in starts]
        self._forward(x0, t, self._cross(prompts), self._reading(slots, starts, stored), output=False)
        for slot, first, kept in zip(slots, starts, stored, strict=True):
            self._bookkeep(slot, kept)
            self.committed[slot] = first + self.family.block_frames

    @torch.inference_mode()
    def recache(self, slot: int, clean: torch.Tensor, prompt: PromptKV) -> None:
        """A `recache` family's prompt switch for the session in `slot`: its clean latent frames `clean`
        (C, n, h, w), the frames [first, committed) of `family.recache_span`, encoded again with `prompt` (one row)
        into its slot, before its next block. The engine keeps a session's last `window` clean frames for this
        (full causal: all of them)."""
        if self.family.prompt_switch != "recache":
            raise ValueError(f"family {self.family.name!r} swaps prompts; it does not recache")
        first, end = self.family.recache_span(self.committed[slot], self.max_frames)
        if end == 0:
            return
        if clean.shape != (self.block_shape[0], end - first, *self.latent) or prompt.rows != 1:
            raise ValueError(
                f"recache needs frames {first} to {end} (shape {(self.block_shape[0], end - first, *self.latent)}) "
                f"and one prompt. Given: {tuple(clean.shape)}, {prompt.rows} prompts"
            )
        held = self.frame_of[slot]
        # Past the window the sink is kept as it was encoded, and the re-encoded frames see it.
        keep = (held >= 0) & (held < self.family.sink) if first > 0 else torch.zeros_like(held, dtype=torch.bool)
        kept = self._stored(first, end, first == 0)
        plan = self._plan([first], end - first, [slot], keep[None], [kept])
        t = torch.full((1,), float(self.family.context_timestep), device=self.device)
        self._forward(clean[None].to(self.device, self.dtype), t, self._cross(prompt), plan, output=False)
        self._bookkeep(slot, kept)

    @torch.inference_mode()
    def reset(self, slot: int) -> None:
        """Empty `slot` for a new session (zeroed: a stale non-finite value would leak through masked attention)."""
        self.k[:, slot] = 0.0
        self.v[:, slot] = 0.0
        self.frame_of[slot] = -1
        self.committed[slot] = 0

    def next_block(self, slot: int, seed: int, prompt: PromptKV, blocks: int | None = None) -> BlockState:
        """The next block of the session in `slot`, at its first step: the noise of (seed, block, 0). `blocks`, the
        stream's length in blocks, is not needed: a block does not depend on the blocks after it."""
        frame = self.committed[slot]
        noise = self.family.noise(seed, frame // self.family.block_frames, 0, self.block_shape)
        return BlockState(slot, frame, seed, prompt, noise.to(self.device, self.dtype))

    def advance(self, states: Sequence[BlockState]) -> list[torch.Tensor | None]:
        """One step boundary: every block in `states` (one per slot) takes one denoising step in one batched call,
        and those that took their last are committed in one more. Per state: the finished block's latents
        (C, F, h, w), its state left as it was; or None, its `x` and `step` moved to the next step."""
        family = self.family
        slots, starts = [s.slot for s in states], [s.start for s in states]
        x = torch.stack([s.x for s in states])
        prompts = PromptKV.cat([s.prompt for s in states])
        v = self.denoise(slots, x, [family.timesteps[s.step] for s in states], prompts, starts)
        blocks = [f // family.block_frames for f in starts]
        x0, after = family.step(x, v, [s.step for s in states], [s.seed for s in states], blocks)
        done = [i for i, state in enumerate(after) if state is None]
        if done:
            self.commit([slots[i] for i in done], x0[done], prompts.take(done), [starts[i] for i in done])
        out: list[torch.Tensor | None] = []
        for s, state, estimate in zip(states, after, x0, strict=True):
            if state is None:
                out.append(estimate)
                continue
            s.x, s.step = state, s.step + 1
            out.append(None)
        return out

    # -- the forward -------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, t: torch.Tensor, cross: _Cross, plan: _Self, output: bool = True) -> Any:
        """The model's forward on blocks `x` (B, C, F, h, w) at timesteps `t` ((B,), or (B, F): per frame), its
        self-attention as `plan` says, its cross-attention over `cross`: the flow prediction (B, C, F, h, w), or
        None without `output` (a write into the cache needs only the blocks)."""
        model = self.model
        b, _, f, h, w = x.shape
        hidden = model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, modulation = self._time(t)
        if t.dim() == 2:  # per frame: each token takes its frame's
            temb = temb.repeat_interleave(self.tokens, dim=1)
            modulation = modulation.repeat_interleave(self.tokens, dim=1).unflatten(2, (6, -1))
        else:
            modulation = modulation.unflatten(1, (6, -1))
        for block in model.blocks:
            hidden = block(hidden, cross, modulation, plan)
        if not output:
            return None
        if temb.dim() == 3:
            shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = model.proj_out(hidden)
        p_t, p_h, p_w = model.config.patch_size
        hidden = hidden.reshape(b, f, h // p_h, w // p_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition embedder's time path (`WanTimeTextImageEmbedding.forward`) for timesteps `t` of any
        shape: the embedding and the blocks' modulation, each with `t`'s shape in front."""
        embedder = self.model.condition_embedder
        sinusoid = embedder.timesteps_proj(t.reshape(-1))
        dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if sinusoid.dtype != dtype and dtype != torch.int8:
            sinusoid = sinusoid.to(dtype)
        temb = embedder.time_embedder(sinusoid).to(self.dtype)
        modulation = embedder.time_proj(embedder.act_fn(temb))
        return temb.unflatten(0, t.shape), modulation.unflatten(0, t.shape)

    # -- the cache ---------------------------------------------------------------------------------
    def _position(self, frame: int) -> int:
        sink = self.family.sink
        return frame if frame < sink else sink + (frame - sink) % self.ring

    def _stored(self, first: int, end: int, sink: bool) -> list[int]:
        """Of frames [first, end) written together, those a slot keeps: sink frames (when `sink`), and the
        last `ring` of the others (earlier ones would be overwritten by later ones of the same write)."""
        s = self.family.sink
        return [f for f in range(first, end) if (f < s and sink) or (f >= s and self.ring and f >= end - self.ring)]

    def _bookkeep(self, slot: int, stored: list[int]) -> None:
        for f in stored:
            self.frame_of[slot, self._position(f)] = f

    def _reading(self, slots: Sequence[int], starts: Sequence[int], stored: list[list[int]] | None = None) -> _Self:
        """The plan of blocks starting at `starts` in `slots`: each sees its slot's frames its family lets a block
        ending there see; with `stored`, the frames each row writes."""
        block = self.family.block_frames
        held = self.frame_of[list(slots)]
        first = torch.tensor(list(starts))[:, None]
        sees = (held >= 0) & (held < first) & self.family.sees(held, first + block, self.span)
        return self._plan(starts, block, slots, sees, stored)

    def _plan(
        self,
        starts: Sequence[int],
        count: int,
        slots: Sequence[int],
        sees: torch.Tensor,
        stored: list[list[int]] | None,
    ) -> _Self:
        """The self-attention of rows of `count` frames, row i from frame `starts[i]`, over slot `slots[i]`'s
        positions where `sees[i]` (B, positions) holds and over all its own tokens; writing `stored[i]` when
        given."""
        tokens, n = self.tokens, count * self.tokens
        own = torch.ones(len(slots), n, dtype=torch.bool)
        mask = torch.cat([sees.repeat_interleave(tokens, dim=1), own], dim=1)[:, None, None].to(self.device)
        cos, sin = rope_at(self.model.rope, torch.tensor(list(starts))[:, None] + torch.arange(count), self.grid)
        plan = _Self(cos, sin, mask, (self.k, self.v), torch.tensor(list(slots), device=self.device))
        if stored is not None:
            self._writes(plan, slots, starts, count, stored)
        return plan

    def _writes(
        self, plan: _Self, slots: Sequence[int], starts: Sequence[int], count: int, stored: list[list[int]]
    ) -> None:
        """Make `plan` write, of rows of `count` frames (row i from frame `starts[i]`), frames `stored[i]` into
        slot `slots[i]` at their positions."""
        tokens, n = self.tokens, count * self.tokens
        per_slot, span = self.positions * tokens, torch.arange(tokens)
        src, dst = [], []
        for i, (slot, first, kept) in enumerate(zip(slots, starts, stored, strict=True)):
            for f in kept:
                src.append(i * n + (f - first) * tokens + span)
                dst.append(slot * per_slot + self._position(f) * tokens + span)
        if src:
            plan.write_src = torch.cat(src).to(self.device)
            plan.write_dst = torch.cat(dst).to(self.device)

    # -- checks --------------------------------------------------------------------------------------
    def _check(self, slots: Sequence[int], x: torch.Tensor, prompts: PromptKV, starts: Sequence[int]) -> None:
        rows = len(slots)
        if x.shape != (rows, *self.block_shape) or prompts.rows != rows or len(starts) != rows:
            raise ValueError(
                f"{rows} rows need blocks of shape {(rows, *self.block_shape)}, {rows} prompts and {rows} starts. "
                f"Given: {tuple(x.shape)}, {prompts.rows}, {len(starts)}"
            )
        if len(set(slots)) != rows or not all(0 <= s < self.slots for s in slots):
            raise ValueError(f"slots must be distinct, from 0 to {self.slots - 1}. Given: {list(slots)}")
        for slot, first in zip(slots, starts, strict=True):
            if first != self.committed[slot] or first + self.family.block_frames > self.max_frames:
                raise ValueError(
                    f"slot {slot}'s next block starts at frame {self.committed[slot]} and a stream ends by frame "
                    f"{self.max_frames}. Given: a block at frame {first}"
                )

    def _timesteps(self, t: torch.Tensor | Sequence[float], x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if t.shape not in ((x.shape[0],), x.shape[:1] + x.shape[2:3]):
            raise ValueError(f"timesteps must be (B,) or (B, F). Given: {tuple(t.shape)}")
        return t

    def _cross(self, prompts: PromptKV) -> _Cross:
        return _Cross(prompts.k[:, :, None], prompts.v[:, :, None])


# -- the reference: no cache ---------------------------------------------------------------------
@dataclass
class _Node:
    """One latent frame as one computation encoded it: its latent, the prompt and timestep it was run with, and
    the nodes its tokens attended to (itself included)."""

    frame: int
    latent: torch.Tensor
    prompt: int
    t: float
    sees: list[int]


class ReferenceStream:
    """One session computed with no cache: every call runs the model once over every frame the block depends on,
    under an explicit attention mask. A frame encoded twice (a `recache` switch) is two sets of tokens, each seen
    by the computations that saw it. Slow (each call recomputes the history); for tests."""

    def __init__(self, runner: CausalWan) -> None:
        self.runner, self.family = runner, runner.family
        self.nodes: list[_Node] = []
        self.current: list[int] = []
        """Per frame so far, the node that encodes it now."""
        self.prompts: list[PromptKV] = []

    def denoise(self, x: torch.Tensor, t: float, prompt: PromptKV) -> torch.Tensor:
        """The flow prediction (C, F, h, w) of the next block `x` (C, F, h, w) at timestep `t`, with `prompt`."""
        first = len(self.current)
        ids = self._block(x, first, prompt, t, self._visible(first, first + x.shape[1]))
        try:
            return self._run(ids)
        finally:
            del self.nodes[ids[0] :]

    def commit(self, x0: torch.Tensor, prompt: PromptKV) -> None:
        """The finished block `x0` (C, F, h, w), encoded clean as the next block's context."""
        first = len(self.current)
        self.current += self._block(
            x0, first, prompt, self.family.context_timestep, self._visible(first, first + x0.shape[1])
        )

    def recache(self, prompt: PromptKV) -> None:
        """A `recache` switch to `prompt`: the family's span encoded again, seeing itself both ways and the kept
        sink."""
        first, end = self.family.recache_span(len(self.current), self.runner.max_frames)
        if end == first:
            return
        kept = [self.current[f] for f in range(min(self.family.sink, first))] if first > 0 else []
        clean = torch.stack([self.nodes[self.current[f]].latent for f in range(first, end)], dim=1)
        self.current[first:end] = self._block(clean, first, prompt, self.family.context_timestep, kept)

    def _visible(self, first: int, end: int) -> list[int]:
        frames = torch.arange(first)
        sees = self.family.sees(frames, torch.tensor(end), self.runner.span)
        return [self.current[f] for f in frames[sees].tolist()]

    def _block(self, latents: torch.Tensor, first: int, prompt: PromptKV, t: float, sees: list[int]) -> list[int]:
        """New nodes for frames `latents` (C, F, h, w) from `first`, seeing `sees` and each other."""
        index = next((i for i, p in enumerate(self.prompts) if p is prompt), None)
        if index is None:
            self.prompts.append(prompt)
            index = len(self.prompts) - 1
        ids = list(range(len(self.nodes), len(self.nodes) + latents.shape[1]))
        for i in range(len(ids)):
            self.nodes.append(_Node(first + i, latents[:, i], index, float(t), [*sees, *ids]))
        return ids

    def _run(self, query: list[int]) -> torch.Tensor:
        """The prediction (C, F, h, w) for nodes `query`: one forward over every node they depend on, each token
        seeing the tokens of the nodes its node sees, rotated at its frame, with its node's prompt and timestep."""
        runner, tokens = self.runner, self.runner.tokens
        needed, todo = set(query), list(query)
        while todo:
            for seen in self.nodes[todo.pop()].sees:
                if seen not in needed:
                    needed.add(seen)
                    todo.append(seen)
        order = sorted(needed)
        place = {node: i for i, node in enumerate(order)}
        nodes = [self.nodes[i] for i in order]
        x = torch.stack([n.latent for n in nodes], dim=1)[None].to(runner.device, runner.dtype)
        t = torch.tensor([[n.t for n in nodes]], dtype=torch.float32, device=runner.device)
        sees = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for i, n in enumerate(nodes):
            sees[i, [place[s] for s in n.sees]] = True
        mask = sees.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)[None, None].to(runner.device)
        cos, sin = rope_at(runner.model.rope, torch.tensor([[n.frame for n in nodes]]), runner.grid)
        used = sorted({n.prompt for n in nodes})
        k = torch.stack([self.prompts[p].k for p in used], dim=2)
        v = torch.stack([self.prompts[p].v for p in used], dim=2)
        pick = torch.tensor([used.index(n.prompt) for n in nodes]).repeat_interleave(tokens)[None]
        cross = _Cross(k, v, pick.to(runner.device))
        with torch.inference_mode():
            out = runner._forward(x, t, cross, _Self(cos, sin, mask))
        return out[0, :, [place[q] for q in query]]


def reference_stream(runner: CausalWan, seed: int, prompts: Sequence[PromptKV]) -> torch.Tensor:
    """The latents (C, frames, h, w) of a stream of `len(prompts)` blocks, block b with `prompts[b]` (a new object:
    a prompt switch), seeded `seed`, computed with no cache (`ReferenceStream`) by the family's sampling."""
    family, ref = runner.family, ReferenceStream(runner)
    out = []
    for block, prompt in enumerate(prompts):
        if block and prompt is not prompts[block - 1] and family.prompt_switch == "recache":
            ref.recache(prompt)
        x = family.noise(seed, block, 0, runner.block_shape).to(runner.device, runner.dtype)
        for step in range(family.steps):
            v = ref.denoise(x, family.timesteps[step], prompt)
            x0, (after,) = family.step(x[None], v[None], [step], [seed], [block])
            if after is not None:
                x = after
        ref.commit(x0[0], prompt)
        out.append(x0[0])
    return torch.cat(out, dim=1)
