"""Rolling Forcing students served from a key/value cache: a window of blocks denoised together.

`RollingWan` is `CausalWan` (`models.wan_causal`: the same model forward, attention processors, prompt keys and
values, one preallocated slot per session) for a family that samples `rolling` (`models.causal_families`):

* a session's state is its **window** (`WindowState`), kept for the whole stream: the blocks in progress, block b
  at step (call − b). `advance` makes one call for every session given, in one batched network call: each
  window takes a new block from noise (while the stream has blocks left), every block moves one step on, and the
  oldest, having taken its last step, is finished, written into the slot and handed back. Rows of different
  windows (filling, full, draining; different streams) are padded to the full window; padded frames are seen by
  no real token.
* the cache holds **un-rotated** keys; each call rotates them where the family puts them (`positions:
  sink-shifted`): the sink (the first block) just before the earliest other frame the call sees, every other frame
  at its absolute position. A slot holds the sink and a ring of the `window − sink` frames a clean re-run sees
  before its own block (`CausalFamily.rolling_history` says what a denoising call sees: fewer).
* a prompt given by `next_block` (a `swap`) is the window's for its next calls, its blocks in progress included,
  as the source's one prompt per call.

`rolling_reference` is the same stream with no cache, written from the source's loop
(`TencentARC/RollingForcing` `pipeline/rolling_forcing_inference.py`, `wan/modules/causal_model.py`): every call
runs the model once over every frame it depends on under an explicit mask, the sink re-encoded where the call
sees it. `tests/models/test_wan_rolling.py` checks that a cached stream equals it. Not thread-safe, as
`CausalWan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.models.causal_families import CausalFamily
from fewstep.models.wan_causal import (
    BlockState,
    CausalWan,
    PromptKV,
    ReferenceStream,
    _Node,
    _Self,
    rope_at,
)


@dataclass(eq=False)
class WindowState(BlockState):
    """One session's rolling window, as `RollingWan.advance` takes it and moves it on: `start` is the first frame
    of its oldest block (the slot's next to commit), `x` its blocks at their current steps (C, frames, h, w; no
    frames before the first call), `step` the calls made so far."""

    blocks: int = 0
    """The stream's length in blocks: no new block enters after the last (the window drains)."""

    @property
    def done(self) -> bool:
        """Whether every block of the stream has been handed back."""
        return self.step > 0 and self.x.shape[1] == 0 and self.step >= self.blocks


class RollingWan(CausalWan):
    """A loaded `WanTransformer3DModel` sampling a `rolling` family over a preallocated cache of un-rotated keys
    (see the module docstring); arguments as `CausalWan`'s."""

    def __init__(self, model: Any, family: CausalFamily, slots: int, max_frames: int, latent: tuple[int, int]) -> None:
        if family.sampling != "rolling":
            raise ValueError(f"family {family.name!r} does not sample a rolling window")
        super().__init__(model, family, slots, max_frames, latent)
        self.windows: list[WindowState | None] = [None] * slots
        self.rope_frames = int(self.model.rope.freqs_cos.shape[0])

    def _held_frames(self) -> int:
        # a clean re-run sees `window - block` frames before its own block, the sink among them or not
        return self.span

    @property
    def window_frames(self) -> int:
        """Latent frames of a full window."""
        return self.family.steps * self.family.block_frames

    # -- sessions ----------------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        super().reset(slot)
        self.windows[slot] = None

    def next_block(self, slot: int, seed: int, prompt: PromptKV, blocks: int | None = None) -> WindowState:
        """The state that makes the next block of the session in `slot`: its window, made at the stream's start
        for a stream of `blocks` blocks, and kept; `prompt` is its prompt from its next call on (a swap)."""
        window = self.windows[slot]
        if window is None:
            most = self.max_frames // self.family.block_frames
            if blocks is None or not 1 <= blocks <= most or self.committed[slot]:
                raise ValueError(f"a new rolling stream needs a fresh slot and 1 to {most} blocks. Given: {blocks}")
            empty = torch.zeros(self.block_shape[0], 0, *self.latent, device=self.device, dtype=self.dtype)
            window = WindowState(slot, 0, seed, prompt, empty, 0, blocks)
            self.windows[slot] = window
        window.prompt = prompt
        return window

    def advance(self, states: Sequence[BlockState]) -> list[torch.Tensor | None]:
        """One call for each window in `states` (one per slot), in one batched network call, and the clean re-run
        of the blocks that finished in one more. Per state: the finished block's latents (C, F, h, w), or None
        while the window fills."""
        family, block = self.family, self.family.block_frames
        windows = [self._window(s) for s in states]
        slots = [w.slot for w in windows]
        # 1. Each window's blocks this call: the new one from its step-0 noise.
        spans, latents, t = [], [], []
        for w in windows:
            first, last = family.rolling_window(w.step, w.blocks)
            x = w.x
            if w.step < w.blocks:
                noise = family.noise(w.seed, w.step, 0, self.block_shape).to(self.device, self.dtype)
                x = torch.cat([x, noise], dim=1)
            spans.append((first, last))
            latents.append(x)
            t.append([family.timesteps[w.step - b] for b in range(first, last + 1) for _ in range(block)])
        # 2. One denoising call over the windows, padded to the full window.
        size = self.window_frames
        padded = torch.zeros(len(windows), self.block_shape[0], size, *self.latent, device=self.device)
        timesteps = torch.zeros(len(windows), size, device=self.device)
        for i, (x, ts) in enumerate(zip(latents, t, strict=True)):
            padded[i, :, : x.shape[1]] = x
            timesteps[i, : len(ts)] = torch.tensor(ts)
        prompts = PromptKV.cat([w.prompt for w in windows])
        frames = [x.shape[1] for x in latents]
        v = self.denoise(slots, padded.to(self.dtype), timesteps, prompts, [w.start for w in windows], frames)
        # 3. Every block one step on: x0, then fresh noise into its next step, or finished.
        rows = [(i, b) for i, (first, last) in enumerate(spans) for b in range(first, last + 1)]

        def cut(x: torch.Tensor, i: int, b: int) -> torch.Tensor:
            at = (b - spans[i][0]) * block
            return x[..., at : at + block, :, :]

        x0, after = family.step(
            torch.stack([cut(latents[i], i, b) for i, b in rows]),
            torch.stack([cut(v[i], i, b) for i, b in rows]),
            [windows[i].step - b for i, b in rows],
            [windows[i].seed for i, _ in rows],
            [b for _, b in rows],
        )
        finished = [(i, x0[r]) for r, (i, _) in enumerate(rows) if after[r] is None]
        # 4. The finished blocks (each window's oldest) written into their slots, clean.
        if finished:
            ids = [i for i, _ in finished]
            self.commit(
                [slots[i] for i in ids],
                torch.stack([x for _, x in finished]),
                prompts.take(ids),
                [windows[i].start for i in ids],
            )
        out: list[torch.Tensor | None] = [None] * len(windows)
        for i, x in finished:
            out[i] = x
            windows[i].start += block
        for i, w in enumerate(windows):
            kept = [state for r, state in enumerate(after) if rows[r][0] == i and state is not None]
            w.x = torch.cat(kept, dim=1) if kept else latents[i][:, :0]
            w.step += 1
        return out

    def _window(self, state: BlockState) -> WindowState:
        if not isinstance(state, WindowState) or self.windows[state.slot] is not state:
            raise ValueError("a rolling runner advances the windows its `next_block` made")
        if state.done:
            raise ValueError(f"slot {state.slot}'s stream of {state.blocks} blocks is finished")
        return state

    # -- the calls ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(
        self,
        slots: Sequence[int],
        x: torch.Tensor,
        t: torch.Tensor | Sequence[float],
        prompts: PromptKV,
        starts: Sequence[int],
        frames: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Flow predictions (B, C, Q, h, w) of windows `x` (B, C, Q, h, w; Q a full window's frames), row i the
        window of the session in slot `slots[i]` from frame `starts[i]` (its oldest block: the slot's next to
        commit), its first `frames[i]` frames real (default all; the rest padding that no real token sees), at
        per-frame timesteps `t` (B, Q), with prompt row i of `prompts`. Writes nothing."""
        family, rows, size = self.family, len(slots), self.window_frames
        frames = [size] * rows if frames is None else list(frames)
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        shape = (rows, self.block_shape[0], size, *self.latent)
        if x.shape != shape or tuple(t.shape) != (rows, size) or prompts.rows != rows or len(frames) != rows:
            raise ValueError(
                f"{rows} rows need windows of shape {shape}, timesteps {(rows, size)} and {rows} prompts. "
                f"Given: {tuple(x.shape)}, {tuple(t.shape)}, {prompts.rows}"
            )
        self._check_rows(slots, starts, frames, size)
        held = self.frame_of[list(slots)]
        sees = torch.zeros_like(held, dtype=torch.bool)
        at = held.clone()
        for i, (first, count) in enumerate(zip(starts, frames, strict=True)):
            if first == 0:  # the source's first windows see nothing but themselves
                continue
            history, sink_at = family.rolling_history(first, count)
            sink = (held[i] >= 0) & (held[i] < family.sink)
            sees[i] = sink | ((held[i] >= history) & (held[i] < first))
            at[i] = torch.where(sink, held[i] + sink_at, held[i])
        plan = self._rolled(slots, starts, size, frames, sees, at)
        return self._forward(x, t, self._cross(prompts), plan)

    @torch.inference_mode()
    def commit(self, slots: Sequence[int], x0: torch.Tensor, prompts: PromptKV, starts: Sequence[int]) -> None:
        """Write finished blocks `x0` (B, C, F, h, w), row i the block at frame `starts[i]` of slot `slots[i]`
        (its next to commit), into their slots: the clean re-run at the context timestep, seeing the cached frames
        of the `window` that ends with it at their absolute positions."""
        block = self.family.block_frames
        self._check(slots, x0, prompts, starts)
        held = self.frame_of[list(slots)]
        first = torch.tensor(list(starts))[:, None]
        sees = (held >= 0) & (held < first) & (held >= first + block - self.span)
        stored = [self._stored(f, f + block, True) for f in starts]
        plan = self._rolled(slots, starts, block, [block] * len(slots), sees, held, stored)
        t = torch.full((len(slots),), float(self.family.context_timestep), device=self.device)
        self._forward(x0, t, self._cross(prompts), plan, output=False)
        for slot, f, kept in zip(slots, starts, stored, strict=True):
            self._bookkeep(slot, kept)
            self.committed[slot] = f + block

    def recache(self, slot: int, clean: torch.Tensor, prompt: PromptKV) -> None:
        raise ValueError(f"family {self.family.name!r} swaps prompts; it does not recache")

    # -- plans -------------------------------------------------------------------------------------
    def _check_rows(self, slots: Sequence[int], starts: Sequence[int], frames: Sequence[int], size: int) -> None:
        block = self.family.block_frames
        if len(set(slots)) != len(slots) or not all(0 <= s < self.slots for s in slots):
            raise ValueError(f"slots must be distinct, from 0 to {self.slots - 1}. Given: {list(slots)}")
        for slot, first, count in zip(slots, starts, frames, strict=True):
            if first != self.committed[slot] or not 0 < count <= size or count % block:
                raise ValueError(
                    f"slot {slot}'s window starts at frame {self.committed[slot]} with 1 to {size // block} blocks. "
                    f"Given: frame {first}, {count} frames"
                )
            if first + count > self.max_frames:
                raise ValueError(f"a stream ends by frame {self.max_frames}. Given: frames to {first + count}")

    def _rolled(
        self,
        slots: Sequence[int],
        starts: Sequence[int],
        count: int,
        frames: Sequence[int],
        sees: torch.Tensor,
        at: torch.Tensor,
        stored: list[list[int]] | None = None,
    ) -> _Self:
        """The self-attention of rows of `count` frames, row i from frame `starts[i]`, its first `frames[i]` real:
        every query sees the real tokens of its row and slot `slots[i]`'s positions where `sees[i]` holds, each
        cached key rotated at frame `at[i]` of its position; writing `stored[i]` (un-rotated) when given."""
        tokens, last = self.tokens, self.rope_frames - 1
        own = (torch.tensor(list(starts))[:, None] + torch.arange(count)).clamp(max=last)  # padding: any position
        cos, sin = rope_at(self.model.rope, own, self.grid)
        cache_cos, cache_sin = rope_at(self.model.rope, at.clamp(0, last), self.grid)
        real = torch.arange(count)[None] < torch.tensor(list(frames))[:, None]
        mask = torch.cat([sees, real], dim=1).repeat_interleave(tokens, dim=1)[:, None, None].to(self.device)
        plan = _Self(
            cos,
            sin,
            mask,
            (self.k, self.v),
            torch.tensor(list(slots), device=self.device),
            cache_cos=cache_cos,
            cache_sin=cache_sin,
        )
        if stored is not None:
            self._writes(plan, slots, starts, count, stored)
        return plan


# -- the reference: no cache ---------------------------------------------------------------------
def rolling_reference(runner: CausalWan, seed: int, prompts: Sequence[PromptKV], blocks: int) -> torch.Tensor:
    """The latents (C, blocks × F, h, w) of a rolling stream of `blocks` blocks seeded `seed`, call c with
    `prompts[c]` (blocks + steps − 1 calls), computed with no cache, as the source's loop computes it: each call
    one forward over every frame its window depends on, each frame as the computation that encoded it saw it."""
    family = runner.family
    block, steps, window = family.block_frames, family.steps, family.window
    assert window is not None and len(prompts) == blocks + steps - 1
    ref = ReferenceStream(runner)
    clean: dict[int, int] = {}
    """Per frame, the node of its clean re-run (what the cache holds)."""
    state: dict[int, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}

    def prompt_index(prompt: PromptKV) -> int:
        for i, p in enumerate(ref.prompts):
            if p is prompt:
                return i
        ref.prompts.append(prompt)
        return len(ref.prompts) - 1

    def encode(
        latents: list[torch.Tensor], positions: list[int], prompt: int, ts: list[float], sees: list[int]
    ) -> list[int]:
        """New nodes, one a frame, seeing `sees` and each other."""
        ids = list(range(len(ref.nodes), len(ref.nodes) + len(latents)))
        for latent, at, t in zip(latents, positions, ts, strict=True):
            ref.nodes.append(_Node(at, latent, prompt, t, [*sees, *ids]))
        return ids

    for call in range(blocks + steps - 1):
        # The window: blocks [first, last], block b at step call - b; a new block enters from noise.
        first = max(0, call - steps + 1)
        last = min(blocks - 1, call)
        if call < blocks:
            state[call] = family.noise(seed, call, 0, runner.block_shape).to(runner.device, runner.dtype)
        prompt = prompt_index(prompts[call])
        start, frames = first * block, (last - first + 1) * block
        # What the call attends to besides its window (causal_model.py:241-300): nothing while the window
        # starts at frame 0; then the cached frames before it, at most max_attention - window - sink of them,
        # after the sink, and the sink (cached un-rotated) rotated to sit just before them.
        history: list[int] = []
        mark = len(ref.nodes)
        if start > 0:
            working = min(start - block, window - frames - block)
            sink_at = start - working - block
            sink = [ref.nodes[clean[f]] for f in range(block)]
            # the sink re-encoded at its new place: it saw only itself, so its keys there are its own, rotated
            copies = encode(
                [n.latent for n in sink], [sink_at + f for f in range(block)], sink[0].prompt, [n.t for n in sink], []
            )
            history = copies + [clean[f] for f in range(start - working, start)]
        latents, positions, ts = [], [], []
        for b in range(first, last + 1):
            for f in range(block):
                latents.append(state[b][:, f])
                positions.append(b * block + f)
                ts.append(family.timesteps[call - b])
        ids = encode(latents, positions, prompt, ts, history)
        v = ref._run(ids)
        del ref.nodes[mark:]
        for b in range(first, last + 1):
            at = (b - first) * block
            x0, (after,) = family.step(state[b][None], v[:, at : at + block][None], [call - b], [seed], [b])
            if after is not None:
                state[b] = after
                continue
            # Finished: its clean re-run sees the frames of the max_attention span ending with it.
            out[b] = x0[0]
            end = (b + 1) * block
            seen = [clean[f] for f in range(max(0, end - window), b * block)]
            done = encode(
                list(x0[0].unbind(1)),
                list(range(b * block, end)),
                prompt,
                [float(family.context_timestep)] * block,
                seen,
            )
            clean.update(zip(range(b * block, end), done, strict=True))
    return torch.cat([out[b] for b in range(blocks)], dim=1)
