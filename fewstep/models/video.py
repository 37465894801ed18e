"""A causal video denoiser over a bounded key/value cache: the network of the streaming video models.

A frame is cut into patches (tokens). Every layer lets a frame's tokens attend to:
- the prompt's tokens, whose keys and values are computed once per prompt (`text_kv`);
- the clean tokens of earlier frames that are still visible: the first `sink` frames (the
  attention sink) and the last `window` frames (`models.video_cache.KVCache`);
- the frame's own tokens.

**Inference is frame by frame** (`denoise` then `write`). `denoise` reads the cache and
never changes it, so a frame can take 1–4 denoising steps. `write` runs one more forward on the
finished clean frame and stores its keys and values in the cache.

**Training is parallel** (`forward_parallel`): a clean stream and a noisy stream of the same
clip are processed at once, under masks that give every frame exactly what it would see at
inference. This is teacher forcing. Run on the model's own outputs as the clean stream, it is the
self-forcing rollout. `tests/models/test_video.py` checks that both paths give the same output.

Order in time comes from a learned bias per head on each key's *age* (own frame 0, the previous
frames 1 … window, sink frames one shared bucket). A bias, unlike a position embedding stored
in the cached keys, stays right as the window rolls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.video_cache import KVCache, TextKV, VideoConfig


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v, written out: the frame-by-frame path is exported to ONNX, and
    torch's exporter mis-strides the output of its fused attention when the batch axis is dynamic."""
    w = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
    return torch.matmul(torch.softmax(w, dim=-1), v)


def _per_token(temb: torch.Tensor) -> torch.Tensor:
    return temb[:, None] if temb.dim() == 2 else temb


class _Block(nn.Module):
    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        self.heads, self.dh = cfg.heads, cfg.dim // cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.text_kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.modulation = nn.Linear(cfg.dim, 4 * cfg.dim)  # shift/scale of both norms from the timestep

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) → (B, heads, N, dh)."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dh).transpose(1, 2)

    def project(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values of frame tokens `x` (B, N, dim) at timestep embedding `temb`:
        (B, dim) for one frame, or (B, N, dim) per token (a whole clip at per-frame times)."""
        shift1, scale1, _, _ = self.modulation(_per_token(temb)).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.split(q), self.split(k), self.split(v)

    def finish(self, x: torch.Tensor, attended: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Residual update of `x` from the attention output (B, heads, N, dh)."""
        b, _, n, _ = attended.shape
        x = x + self.out(attended.transpose(1, 2).reshape(b, n, -1))
        _, _, shift2, scale2 = self.modulation(_per_token(temb)).chunk(4, dim=-1)
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class _Level(nn.Module):
    """Half the resolution: a strided convolution then a 3×3 convolution, each normed, with the
    timestep added between them (a convolution that does not know the noise level cannot tell
    noise to remove from detail to keep)."""

    def __init__(self, cin: int, cout: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU())
        self.time = nn.Linear(dim, cout)
        self.body = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.body(self.down(x) + self.time(temb)[:, :, None, None]))


class _Up(nn.Module):
    """Double the resolution, then fuse with the encoder's features at that resolution and the timestep."""

    def __init__(self, cin: int, cskip: int, dim: int) -> None:
        super().__init__()
        self.up = nn.Conv2d(cin, cskip, 3, padding=1)
        self.time = nn.Linear(dim, cskip)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * cskip, cskip, 3, padding=1),
            nn.GroupNorm(8, cskip),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest")) + self.time(temb)[:, :, None, None]
        return cast(torch.Tensor, self.fuse(torch.cat([x, skip], dim=1)))


class VideoDenoiser(nn.Module):
    """Predicts the flow velocity of a frame at time t, given the prompt and the visible clean frames.

    Per frame it is a small U-Net: convolutions take the frame down by `patch` to a grid of tokens,
    the transformer layers (the only place frames and the prompt meet) run on those tokens, and
    convolutions bring them back up with the encoder's features at each resolution. Convolutions
    draw crisp edges cheaply; a linear patch decoder over the same tokens learned colours and
    backgrounds but not shapes in the same CPU budget (see `trainer/video.py`).
    """

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        levels = int(math.log2(cfg.patch))
        if 2**levels != cfg.patch or cfg.size % cfg.patch:
            raise ValueError(f"patch must be a power of two dividing size. Given: patch={cfg.patch}, size={cfg.size}")
        self.cfg = cfg
        widths = [cfg.width * min(2**i, 2) for i in range(levels + 1)]
        self.conv_in = nn.Conv2d(cfg.channels * (1 + cfg.context_frames), widths[0], 3, padding=1)
        self.time_in = nn.Linear(cfg.dim, widths[0])
        self.down = nn.ModuleList(_Level(widths[i], widths[i + 1], cfg.dim) for i in range(levels))
        self.to_tokens = nn.Linear(widths[-1], cfg.dim)
        self.from_tokens = nn.Linear(cfg.dim, widths[-1])
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], cfg.dim) for i in reversed(range(levels)))
        self.conv_out = nn.Conv2d(widths[0], cfg.channels, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(cfg.tokens, cfg.dim) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, cfg.dim)
        self.text_pool = nn.Linear(cfg.text_dim, cfg.dim)
        self.time = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.age_bias = nn.Parameter(torch.zeros(cfg.layers, cfg.heads, cfg.ages))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(cast(torch.Tensor, self.conv_out.bias))

    # -- shared pieces ---------------------------------------------------------------------
    @property
    def _layers(self) -> list[_Block]:
        return [cast(_Block, b) for b in self.blocks]

    def _tokens(
        self, x: torch.Tensor, temb: torch.Tensor, prev: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) frames at timestep embeddings (B, dim), with the clean frames before each
        (B, context_frames, C, H, W) → (B, tokens, dim) and the skip features."""
        h = torch.cat([x, prev.flatten(1, 2)], dim=1)
        h = F.silu(self.conv_in(h) + self.time_in(temb)[:, :, None, None])
        skips = [h]
        for level in self.down:
            h = level(h, temb)
            skips.append(h)
        tokens = self.to_tokens(h.flatten(2).transpose(1, 2))
        return tokens + self.pos, skips[:-1]

    def _pixels(self, tokens: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        g = self.cfg.size // self.cfg.patch
        h = self.from_tokens(tokens).transpose(1, 2).reshape(b, -1, g, g)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            h = up(h, skip, temb)
        return cast(torch.Tensor, self.conv_out(h))

    def _velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """The flow velocity from the head's output `out` for frames `x` at times `t` (B,), with the clean
        frames before them `prev` (B, context_frames, C, H, W)."""
        if not self.cfg.residual:
            return out
        x0 = out + prev[:, 0] if prev.shape[1] else out
        return (x - x0) / t.clamp(min=T_FLOOR).view(-1, 1, 1, 1)

    def _temb(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The conditioning every layer and level gets: the timestep's embedding plus the pooled prompt
        (B, dim). The prompt then reaches the convolutions that draw the shape, not only the tokens."""
        return self.time(_timestep_embedding(t, self.cfg.dim)) + pooled

    def text_kv(self, states: torch.Tensor, mask: torch.Tensor) -> TextKV:
        """Keys and values of the prompt in every layer: (B, text_tokens, text_dim) → TextKV."""
        h = self.text_in(states)
        ks, vs = [], []
        for block in self._layers:
            k, v = block.text_kv(h).chunk(2, dim=-1)
            ks.append(block.split(k))
            vs.append(block.split(v))
        weights = mask.float()[..., None]
        pooled = self.text_pool((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))
        return TextKV(torch.stack(ks), torch.stack(vs), mask.bool(), pooled)

    def _age_bucket(self, age: torch.Tensor, is_sink: torch.Tensor) -> torch.Tensor:
        """Bias index of a key `age` frames old: 0 own frame, 1 … window, window + 1 for an earlier sink frame."""
        far = is_sink & (age > 0)
        return torch.where(far, torch.full_like(age, self.cfg.window + 1), age.clamp(0, self.cfg.window))

    # -- inference: one frame at a time ----------------------------------------------------
    def _cached_bias(self, cache: KVCache, layer: int) -> torch.Tensor:
        """(B, heads, 1, slots × tokens) additive bias of the cached keys for the next frame: age or -inf."""
        cfg = self.cfg
        frame = cache.written[:, None]  # the frame being made
        held = cache.frame_of
        is_sink = held < cfg.sink
        visible = (held >= 0) & (is_sink | (frame - held <= cfg.window))
        bucket = self._age_bucket(frame - held, is_sink)
        bias = self.age_bias[layer][:, bucket].permute(1, 0, 2)  # (B, heads, slots)
        bias = bias.masked_fill(~visible[:, None], float("-inf"))
        return bias.repeat_interleave(cfg.tokens, dim=-1)[:, :, None]

    def _step(
        self, x: torch.Tensor, t: torch.Tensor, text: TextKV, cache: KVCache, pixels: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Velocity (None without `pixels`) and this frame's keys and values in every layer."""
        cfg = self.cfg
        b = x.shape[0]
        temb = self._temb(t, text.pooled)
        h, skips = self._tokens(x, temb, cache.frames)
        ks, vs = [], []
        text_bias = torch.zeros(b, 1, 1, text.mask.shape[1]).masked_fill(~text.mask[:, None, None], float("-inf"))
        own_bias = torch.zeros(b, 1, 1, cfg.tokens)
        for i, block in enumerate(self._layers):
            q, k, v = block.project(h, temb)
            ks.append(k)
            vs.append(v)
            if not pixels and i == cfg.layers - 1:
                break  # the last layer's keys and values are all `write` needs
            ck = cache.k[i].reshape(b, cfg.heads, -1, block.dh)
            cv = cache.v[i].reshape(b, cfg.heads, -1, block.dh)
            keys = torch.cat([text.k[i], ck, k], dim=2)
            values = torch.cat([text.v[i], cv, v], dim=2)
            bias = torch.cat(
                [
                    text_bias.expand(b, cfg.heads, 1, -1),
                    self._cached_bias(cache, i),
                    (own_bias + self.age_bias[i][:, 0].view(1, -1, 1, 1)).expand(b, cfg.heads, 1, -1),
                ],
                dim=-1,
            )
            h = block.finish(h, _attention(q, keys, values, bias), temb)
        vel = self._velocity(self._pixels(h, skips, temb), x, t, cache.frames) if pixels else None
        return vel, torch.stack(ks), torch.stack(vs)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: TextKV, cache: KVCache) -> torch.Tensor:
        """Velocity for the next frame of each stream at times `t` (B,); the cache is only read."""
        v = self._step(x, t, text, cache)[0]
        assert v is not None
        return v

    def keys_values(self, clean: torch.Tensor, text: TextKV, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """A finished frame's keys and values in every layer, (layers, B, heads, tokens, head_dim): one
        forward at t = 0 that stops before the last layer's attention. The cache is only read."""
        _, k, v = self._step(clean, torch.zeros(clean.shape[0]), text, cache, pixels=False)
        return k, v

    def write(self, clean: torch.Tensor, text: TextKV, cache: KVCache) -> None:
        """Store the finished frame's keys and values and advance the streams."""
        cache.store(*self.keys_values(clean, text, cache), clean, sink=self.cfg.sink, window=self.cfg.window)

    # -- training: a whole clip at once ----------------------------------------------------
    def _clip_masks(self, nf: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a clip of `nf` frames, token by token: age (query frame − key frame), which keys are earlier
        frames still in view (the sink, or within the window), and each pair's age-bias bucket."""
        cfg = self.cfg
        frame = torch.arange(nf).repeat_interleave(cfg.tokens)
        age = frame[:, None] - frame[None, :]
        is_sink = (frame[None, :] < cfg.sink).expand(nf * cfg.tokens, -1)
        earlier = (age >= 1) & (is_sink | (age <= cfg.window))
        return age, earlier, self._age_bucket(age, is_sink)

    def _previous(self, clean: torch.Tensor) -> torch.Tensor:
        """(B × F, context_frames, C, H, W): for every frame of a clip, the clean frames before it, newest
        first, zeros before the clip's start (what `KVCache.frames` holds at inference)."""
        b, nf = clean.shape[:2]
        p = self.cfg.context_frames
        if p == 0:
            return clean.new_zeros(b * nf, 0, *clean.shape[2:])
        padded = torch.cat([torch.zeros_like(clean[:, :1]).expand(b, p, *clean.shape[2:]), clean], dim=1)
        prev = torch.stack([padded[:, p - j - 1 : p - j - 1 + nf] for j in range(p)], dim=2)
        return prev.flatten(0, 1)

    def context_kv(self, clean: torch.Tensor, text: TextKV) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of every layer for a clip of clean frames (B, F, C, H, W), each frame seeing the
        earlier ones in view, as `write` would have stored them one by one: (B, heads, F × tokens, dh) each.
        The whole history in one pass, for training, and for the no-cache baseline of `bench/video.py`."""
        cfg = self.cfg
        b, nf = clean.shape[:2]
        n = cfg.tokens
        ec = self._temb(torch.zeros(b * nf), text.pooled.repeat_interleave(nf, dim=0))
        hc = self._tokens(clean.flatten(0, 1), ec, self._previous(clean))[0].view(b, nf * n, -1)
        tc = ec.view(b, nf, -1).repeat_interleave(n, dim=1)
        age, earlier, bucket = self._clip_masks(nf)
        tb = torch.zeros(b, 1, 1, text.mask.shape[1]).masked_fill(~text.mask[:, None, None], float("-inf"))
        ks, vs = [], []
        for i, block in enumerate(self._layers):
            qc, kc, vc = block.project(hc, tc)
            ks.append(kc)
            vs.append(vc)
            if i == cfg.layers - 1:
                break
            clean_bias = self.age_bias[i][:, bucket].masked_fill(~(earlier | (age == 0)), float("-inf"))
            bias = torch.cat([tb.expand(b, cfg.heads, nf * n, -1), clean_bias[None].expand(b, -1, -1, -1)], dim=-1)
            out = F.scaled_dot_product_attention(
                qc, torch.cat([text.k[i], kc], 2), torch.cat([text.v[i], vc], 2), attn_mask=bias
            )
            hc = block.finish(hc, out, tc)
        return ks, vs

    def forward_parallel(
        self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Velocities for every noisy frame (B, F, C, H, W) at per-frame times `t` (B, F), each frame seeing
        the clean frames before it exactly as frame-by-frame inference would."""
        cfg = self.cfg
        b, nf = clean.shape[:2]
        n = cfg.tokens
        text = self.text_kv(states, mask)
        kcs, vcs = self.context_kv(clean, text)
        en = self._temb(t.flatten(), text.pooled.repeat_interleave(nf, dim=0))
        prev = self._previous(clean)
        hn, skips = self._tokens(noisy.flatten(0, 1), en, prev)
        hn = hn.view(b, nf * n, -1)
        tn = en.view(b, nf, -1).repeat_interleave(n, dim=1)
        age, earlier, bucket = self._clip_masks(nf)
        tb = torch.zeros(b, 1, 1, text.mask.shape[1]).masked_fill(~text.mask[:, None, None], float("-inf"))
        for i, block in enumerate(self._layers):
            ab = self.age_bias[i][:, bucket]  # (heads, Nq, Nk)
            to_clean = ab.masked_fill(~earlier, float("-inf"))
            own = ab.masked_fill(age != 0, float("-inf"))
            qn, kn, vn = block.project(hn, tn)
            # Text, earlier clean frames in view, and its own noisy frame (what `denoise` computes).
            keys = torch.cat([text.k[i], kcs[i], kn], 2)
            values = torch.cat([text.v[i], vcs[i], vn], 2)
            bias_n = torch.cat(
                [
                    tb.expand(b, cfg.heads, nf * n, -1),
                    to_clean[None].expand(b, -1, -1, -1),
                    own[None].expand(b, -1, -1, -1),
                ],
                dim=-1,
            )
            hn = block.finish(hn, F.scaled_dot_product_attention(qn, keys, values, attn_mask=bias_n), tn)
        out = self._velocity(self._pixels(hn.reshape(b * nf, n, -1), skips, en), noisy.flatten(0, 1), t.flatten(), prev)
        return out.view(b, nf, cfg.channels, cfg.size, cfg.size)


T_FLOOR = 1e-3
"""Smallest t a residual network divides by: its velocity is (x − x0) / t."""


def load_video_net(folder: Path) -> VideoDenoiser:
    """A video network from a checkpoint folder (hash-checked, strict shapes), in eval mode."""
    manifest, state = load_checkpoint(folder)
    try:
        net = VideoDenoiser(VideoConfig(**manifest["architecture"]["config"]))
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder.name}: weights do not fit the manifest's architecture") from e
    return net.eval()
