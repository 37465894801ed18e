"""Streaming decode of a causal Wan student's latents: a block's pixel frames leave as soon as the block is done.

The Wan VAE (diffusers' `AutoencoderKLWan`: Wan 2.1's, and Wan 2.2's with its 2×2 patches) is causal in time. Its
own whole-clip decode (`_decode`) runs the decoder one latent frame at a time and carries a feature cache from one
frame to the next: for every causal convolution, the last two time steps of its input (`None` before the first
frame; `"Rep"` at a temporal upsampler, whose first frame is not upsampled). It keeps that cache on the module
(`_feat_map`, `_conv_idx`) and clears it before and after each clip. A stream needs the cache to outlive one call,
and one cache per stream on a VAE that several streams share.

`StreamDecoder` keeps its stream's cache in a list of its own and hands it to the VAE's decoder as the decoder's
`feat_cache` argument: the very call `_decode` makes, with the stream's list in place of `_feat_map`. Nothing is
swapped in or out of the module and nothing of a stream is stored on it, so streams interleave on one VAE in any
order, and a whole-clip `vae.decode` in between changes nothing. Frame by frame it is `_decode`'s
own arithmetic on the same values, so a clip decoded block by block, in blocks of any lengths, is its whole-clip
decode (tests/models/test_wan_vae.py measures the difference: 0 in float32 on CPU).

A stream's first latent frame gives 1 pixel frame, every later one 4 (the VAE's temporal factor): F latent frames
give 1 + 4 (F − 1), whatever the blocks.

`decode_streams` decodes several streams' blocks in batched decoder calls, each row with its own cache. Every
layer of the decoder works row by row (causal convolutions, per-position RMS norms, attention within one frame),
so a batched row is its own decode; only the cache's form differs with a stream's age: all `None` before its first
frame, one time step and `"Rep"` entries before its second, two time steps everywhere from then on. Streams of the
same age (0, 1, or 2 and more latent frames decoded) and latent size go through together; in steady state that is
every stream. A batched row differs from its stream decoded alone only by the rounding of batched kernels (3.6e-7
at most, measured in float32 on CPU).

Memory: a stream's cache has a fixed size from its second latent frame on (`cache_bytes`); Wan 2.1's VAE at
480 × 832 holds 944 286 720 values, 1.76 GiB in bfloat16 and 3.52 GiB in float32, per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fewstep.models import lazy

WAN_VAE = "diffusers.models.autoencoders.autoencoder_kl_wan"

FeatureCache = list[Any]
"""One entry per causal convolution of the decoder, in the order the decoder reaches them: `None` (not reached
yet, or a convolution that keeps nothing), `"Rep"` (a temporal upsampler after the stream's first frame) or a
tensor (rows, channels, 1 or 2 time steps, height, width)."""


class StreamDecoder:
    """One stream's decoding state on a shared `AutoencoderKLWan`: its feature cache and how many latent frames it
    has decoded. Made per session; `decode` is called as each latent block is done, `reset` starts a new stream."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        conv = lazy.attr(WAN_VAE, "WanCausalConv3d")
        self._slots = sum(isinstance(m, conv) for m in vae.decoder.modules())
        self.frames = 0
        """Latent frames decoded since the stream began."""
        self.size: tuple[int, int] | None = None
        """The stream's latent (height, width), set by its first block."""
        self.cache: FeatureCache = [None] * self._slots

    def reset(self) -> None:
        """Forget the stream: the next block decodes as a clip's first frames."""
        self.frames = 0
        self.size = None
        self.cache = [None] * self._slots

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The stream's next latent block (1, C, F, h, w), as the sampler holds it (normalised by the VAE's
        `latents_mean` and `latents_std`, as WanPipeline's latents are), → its pixel frames (frames, 3, H, W) in
        [-1, 1]: 4 per latent frame, but 1 for the stream's very first. `models.pipelines.postprocess` turns them
        into uint8 (frames, H, W, 3), rounded as WanPipeline's video processor rounds."""
        return decode_streams([self], [latents])[0]

    @property
    def nbytes(self) -> int:
        """Bytes the stream's feature cache holds now."""
        return sum(t.numel() * t.element_size() for t in self.cache if isinstance(t, torch.Tensor))

    def _check(self, latents: torch.Tensor) -> None:
        c = self.vae.config.z_dim
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != c or latents.shape[2] < 1:
            raise ValueError(f"a latent block must be (1, {c}, frames ≥ 1, h, w). Given: {tuple(latents.shape)}")
        size = (latents.shape[3], latents.shape[4])
        if self.size is not None and size != self.size:
            raise ValueError(f"the stream's latent size is {self.size}. Given: {size}")

    def _prepared(self, latents: torch.Tensor) -> torch.Tensor:
        """`latents` in the VAE's units, through its `post_quant_conv`, as WanPipeline and `_decode` compute them."""
        cfg = self.vae.config
        z = latents.to(self.vae.device, self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return self.vae.post_quant_conv(z / inverse_std + mean)

    def _finished(self, decoded: torch.Tensor) -> torch.Tensor:
        """The decoder's output for one block (1, channels, frames, H, W) → (frames, 3, H, W) in [-1, 1]."""
        patch = self.vae.config.patch_size
        if patch is not None:
            decoded = lazy.attr(WAN_VAE, "unpatchify")(decoded, patch_size=patch)
        return decoded.clamp(-1.0, 1.0)[0].permute(1, 0, 2, 3)


@torch.no_grad()
def decode_streams(streams: Sequence[StreamDecoder], blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each stream's next latent block → its pixel frames, as `StreamDecoder.decode` gives them one stream at a time,
    in batched decoder calls: latent frame by latent frame, the streams with a frame at that index, of one age and
    latent size, go through the decoder together, each row with its own cache. Streams share one VAE, each given
    once; blocks may differ in length.

    Blocks are checked before anything runs. An error from the networks themselves (out of memory) leaves the given
    streams part-way through their blocks: reset them. After a batched call a stream's cache entries are views of
    the batch's tensors, which live until every stream of that batch has decoded again (or been reset)."""
    if not streams and not blocks:
        return []
    if len(streams) != len(blocks):
        raise ValueError(f"one block per stream. Given: {len(streams)} streams, {len(blocks)} blocks")
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream may be given once per call")
    if any(s.vae is not streams[0].vae for s in streams):
        raise ValueError("the streams of one call share one VAE")
    for stream, latents in zip(streams, blocks, strict=True):
        stream._check(latents)
    inputs = [stream._prepared(latents) for stream, latents in zip(streams, blocks, strict=True)]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    for index in range(max(x.shape[2] for x in inputs)):
        groups: dict[tuple[int, int, int], list[int]] = {}
        for row, x in enumerate(inputs):
            if index < x.shape[2]:
                groups.setdefault((min(streams[row].frames, 2), x.shape[3], x.shape[4]), []).append(row)
        for (age, *_), rows in groups.items():
            x = torch.cat([inputs[r][:, :, index : index + 1] for r in rows])
            cache = _joined([streams[r].cache for r in rows])
            out = streams[rows[0]].vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=age == 0)
            for k, r in enumerate(rows):
                stream = streams[r]
                stream.cache = cache if len(rows) == 1 else [_row(entry, k) for entry in cache]
                stream.size = (x.shape[3], x.shape[4])
                stream.frames += 1
                outputs[r].append(out[k : k + 1])
    return [stream._finished(torch.cat(out, dim=2)) for stream, out in zip(streams, outputs, strict=True)]


def cache_bytes(vae: Any, height: int, width: int) -> int:
    """Bytes one stream's feature cache holds from its second latent frame on (its size is fixed from then), for
    `height` × `width` pixel frames in the VAE's dtype: a dry run of a copy of the decoder on the meta device
    (shapes only: nothing is allocated or computed)."""
    factor = vae.config.scale_factor_spatial
    if height % factor or width % factor:
        raise ValueError(f"the frame's sides must be multiples of {factor}. Given: {height} × {width}")
    with torch.device("meta"):
        shadow = type(vae).from_config(vae.config)
    stream = StreamDecoder(shadow)
    stream.decode(torch.zeros(1, vae.config.z_dim, 2, height // factor, width // factor, device="meta"))
    values = sum(t.numel() for t in stream.cache if isinstance(t, torch.Tensor))
    return values * vae.dtype.itemsize


def _joined(caches: list[FeatureCache]) -> FeatureCache:
    """Several streams' caches (of one age and latent size: entries alike but for their tensors' values) as one
    cache whose rows are theirs, in order."""
    if len(caches) == 1:
        return caches[0]
    joined = zip(*caches, strict=True)
    return [torch.cat(entries) if isinstance(entries[0], torch.Tensor) else entries[0] for entries in joined]


def _row(entry: Any, row: int) -> Any:
    return entry[row : row + 1] if isinstance(entry, torch.Tensor) else entry
