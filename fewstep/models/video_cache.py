"""The video network's contract: its config, its bounded key/value cache, and what any backend provides.

`VideoConfig` sizes a network and its cache. `KVCache` holds the clean frames' keys and values for a
batch of streams with a static shape (`sink + window` slots), so per-frame cost is flat for a stream of
any length and the shape is fixed for ONNX too. `TextKV` holds a prompt's keys and values, computed once
per prompt. `VideoNet` is what the engine runs: `models.video.VideoDenoiser` itself, or its exported
graphs on another backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class VideoConfig:
    """Sizes of the network and of its cache."""

    size: int = 16
    channels: int = 3
    patch: int = 4
    dim: int = 64
    heads: int = 4
    layers: int = 3
    text_dim: int = 384
    width: int = 32
    context_frames: int = 2
    """The latest clean frames a frame also sees as pixels (input channels), beside the cached tokens."""
    sink: int = 1
    window: int = 8
    residual: bool = False
    """Predict the frame as the latest clean frame plus a correction (x0 = previous + output), and return
    the velocity that estimate implies. A video's next frame is mostly its last one: with this the
    network starts from a copy and learns the motion, instead of redrawing the scene every frame."""

    @property
    def tokens(self) -> int:
        """Tokens per frame."""
        return (self.size // self.patch) ** 2

    @property
    def ages(self) -> int:
        """Age buckets: own frame, 1 … window frames back, sink."""
        return self.window + 2

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class KVCache:
    """Clean frames' keys and values for `batch` streams: (layers, batch, heads, slots, tokens, head_dim),
    and the latest clean frames as pixels: (batch, context_frames, C, H, W), newest first, zeros before
    the stream's start.

    Slot i < sink holds frame i; later frames go round the `window` slots after them.
    `frame_of[b, slot]` is the frame index held (-1: empty); `written[b]` counts frames written.
    """

    k: torch.Tensor
    v: torch.Tensor
    frame_of: torch.Tensor
    written: torch.Tensor
    frames: torch.Tensor

    @classmethod
    def empty(cls, cfg: VideoConfig, batch: int) -> KVCache:
        shape = (cfg.layers, batch, cfg.heads, cfg.sink + cfg.window, cfg.tokens, cfg.dim // cfg.heads)
        return cls(
            torch.zeros(shape),
            torch.zeros(shape),
            torch.full((batch, cfg.sink + cfg.window), -1, dtype=torch.long),
            torch.zeros(batch, dtype=torch.long),
            torch.zeros(batch, cfg.context_frames, cfg.channels, cfg.size, cfg.size),
        )

    def store(self, k: torch.Tensor, v: torch.Tensor, clean: torch.Tensor, sink: int, window: int) -> None:
        """Put a frame's keys and values (`VideoDenoiser.keys_values`) in each stream's next slot (the first
        `sink` frames stay, later ones go round the window) and the frame's pixels first in `frames`.
        Advances every stream by one frame."""
        if self.frames.shape[1]:
            self.frames = torch.cat([clean[:, None], self.frames[:, :-1]], dim=1)
        f = self.written
        slot = torch.where(f < sink, f, sink + (f - sink) % window)
        rows = torch.arange(k.shape[1])
        for i in range(k.shape[0]):
            self.k[i, rows, :, slot] = k[i]
            self.v[i, rows, :, slot] = v[i]
        self.frame_of[rows, slot] = f
        self.written += 1

    def take(self, rows: torch.Tensor) -> KVCache:
        """A copy of streams `rows` (a batch of some sessions)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.frame_of[rows], self.written[rows], self.frames[rows])

    def put(self, rows: torch.Tensor, part: KVCache) -> None:
        """Write back streams `rows` from `part` (what `take` gave, after `store`)."""
        self.k[:, rows] = part.k
        self.v[:, rows] = part.v
        self.frame_of[rows] = part.frame_of
        self.written[rows] = part.written
        self.frames[rows] = part.frames

    def reset(self, row: int) -> None:
        """Empty one stream's cache (a new session in that row)."""
        self.k[:, row] = 0.0
        self.v[:, row] = 0.0
        self.frame_of[row] = -1
        self.written[row] = 0
        self.frames[row] = 0.0


@dataclass
class TextKV:
    """The prompt's keys and values per layer, and its padding mask: computed once per prompt."""

    k: torch.Tensor  # (layers, batch, heads, text_tokens, head_dim)
    v: torch.Tensor
    mask: torch.Tensor  # (batch, text_tokens) bool
    pooled: torch.Tensor  # (batch, dim): the whole prompt in one vector, added to the timestep embedding

    def take(self, rows: torch.Tensor) -> TextKV:
        return TextKV(self.k[:, rows], self.v[:, rows], self.mask[rows], self.pooled[rows])


class VideoNet(Protocol):
    """What the video engine runs: `VideoDenoiser` itself, or its exported graphs on another backend."""

    cfg: VideoConfig

    def text_kv(self, states: torch.Tensor, mask: torch.Tensor) -> TextKV: ...

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: TextKV, cache: KVCache) -> torch.Tensor: ...

    def keys_values(self, clean: torch.Tensor, text: TextKV, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]: ...
