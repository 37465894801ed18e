"""The streaming Wan VAE decode (`models.wan_vae`) on the tiny WanPipeline's VAE (`tests/pipelines.py::wan`): a
clip decoded block by block, in blocks of any lengths, is its whole-clip decode as WanPipeline calls it; streams
interleaved on one VAE, one by one or batched, are each their own clip; `reset` starts a new stream; WanPipeline's
own video is the stream's; the cache's size is what `cache_bytes` derives. Differences are printed (run with -s),
and so is the cost of decoding by blocks against the whole clip."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.models.pipelines import postprocess
from fewstep.models.wan_vae import StreamDecoder, cache_bytes, decode_streams

pytestmark = pytest.mark.slow

LATENT = (8, 10)
"""Latent rows and columns: 64 × 80 pixel frames."""
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def vae(wan_src: Path) -> Any:
    import diffusers

    return diffusers.AutoencoderKLWan.from_pretrained(str(wan_src / "vae")).eval()


def latents(frames: int, seed: int, channels: int = 16, size: tuple[int, int] = LATENT) -> torch.Tensor:
    """Random latents (1, channels, frames, h, w) in the sampler's normalised units."""
    return torch.randn(1, channels, frames, *size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def whole_clip(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """The whole clip's decode, as WanPipeline decodes its latents → (frames, 3, H, W) in [-1, 1]."""
    z = z.to(vae.device, vae.dtype)
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    return vae.decode(z / inverse_std + mean, return_dict=False)[0][0].permute(1, 0, 2, 3)


def streamed(stream: StreamDecoder, z: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """`z` decoded by `stream` in blocks of `blocks` latent frames, each block's frame count checked."""
    out, start = [], 0
    for n in blocks:
        first = stream.frames == 0
        frames = stream.decode(z[:, :, start : start + n])
        assert frames.shape[0] == (1 + 4 * (n - 1) if first else 4 * n)
        out.append(frames)
        start += n
    assert start == z.shape[2]
    return torch.cat(out)


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("blocks", [(1, 3, 3, 3), (1,) * 10, (2, 5, 1, 2), (10,), (4, 3, 3)])
def test_a_clip_decoded_block_by_block_is_its_whole_clip_decode(vae: Any, blocks: tuple[int, ...]) -> None:
    z = latents(sum(blocks), seed=1)
    whole = whole_clip(vae, z)
    assert whole.shape == (1 + 4 * (z.shape[2] - 1), 3, LATENT[0] * 8, LATENT[1] * 8)
    gap = difference(streamed(StreamDecoder(vae), z, blocks), whole)
    print(f"blocks {blocks}: largest difference from the whole clip {gap:.3g}")
    assert gap <= TOLERANCE


def test_sessions_interleaved_on_one_vae_are_each_their_own_clip(vae: Any) -> None:
    za, zb = latents(10, seed=2), latents(7, seed=3)
    a, b = StreamDecoder(vae), StreamDecoder(vae)
    out_a, out_b = [a.decode(za[:, :, :1])], []
    for (a0, a1), (b0, b1) in zip([(1, 4), (4, 7), (7, 10)], [(0, 1), (1, 4), (4, 7)], strict=True):
        out_b.append(b.decode(zb[:, :, b0:b1]))
        whole_clip(vae, latents(4, seed=9))  # the module's own cache, used and cleared between the streams' blocks
        out_a.append(a.decode(za[:, :, a0:a1]))
    gaps = difference(torch.cat(out_a), whole_clip(vae, za)), difference(torch.cat(out_b), whole_clip(vae, zb))
    print(f"interleaved: largest differences {gaps[0]:.3g}, {gaps[1]:.3g}")
    assert max(gaps) <= TOLERANCE


def test_sessions_decoded_in_batched_calls_are_each_their_own_clip(vae: Any) -> None:
    """Three streams of different ages (first frame, second frame, steady state) and uneven blocks, batched; then a
    stream of another latent size beside them."""
    zs = [latents(10, seed=4), latents(10, seed=5), latents(9, seed=6)]
    streams = [StreamDecoder(vae) for _ in zs]
    out: list[list[torch.Tensor]] = [[streams[0].decode(zs[0][:, :, :2])], [], []]
    out[1].append(streams[1].decode(zs[1][:, :, :1]))
    rounds = [[(2, 5), (1, 4), (0, 3)], [(5, 6), (4, 8), (3, 4)], [(6, 10), (8, 10), (4, 9)]]
    for spans in rounds:
        decoded = decode_streams(streams, [z[:, :, s0:s1] for z, (s0, s1) in zip(zs, spans, strict=True)])
        for row, frames in enumerate(decoded):
            out[row].append(frames)
    other, z_other = StreamDecoder(vae), latents(4, seed=7, size=(6, 4))
    mixed = decode_streams([other, StreamDecoder(vae)], [z_other, zs[0]])
    gaps = [difference(torch.cat(o), whole_clip(vae, z)) for o, z in zip(out, zs, strict=True)]
    gaps += [difference(mixed[0], whole_clip(vae, z_other)), difference(mixed[1], whole_clip(vae, zs[0]))]
    print("batched: largest differences " + ", ".join(f"{g:.3g}" for g in gaps))
    assert max(gaps) <= TOLERANCE


def test_reset_starts_a_new_stream(vae: Any) -> None:
    stream, z = StreamDecoder(vae), latents(7, seed=8)
    streamed(stream, latents(4, seed=9), (1, 3))
    assert stream.frames == 4
    stream.reset()
    assert (stream.frames, stream.size, stream.nbytes) == (0, None, 0)
    assert difference(streamed(stream, z, (1, 3, 3)), whole_clip(vae, z)) <= TOLERANCE


def test_bad_blocks_are_refused_before_anything_runs(vae: Any) -> None:
    stream = StreamDecoder(vae)
    stream.decode(latents(1, seed=10))
    cache = list(stream.cache)
    for bad in (latents(2, seed=11, channels=4), torch.zeros(2, 16, 1, *LATENT), latents(1, seed=12, size=(4, 4))):
        with pytest.raises(ValueError):
            stream.decode(bad)
    with pytest.raises(ValueError, match="once"):
        decode_streams([stream, stream], [latents(1, seed=13)] * 2)
    assert stream.frames == 1 and all(x is y for x, y in zip(stream.cache, cache, strict=True))


def test_wan_pipeline_video_is_the_streams_video(wan_src: Path) -> None:
    """WanPipeline's own frames (uint8, as its video processor rounds) are its latents decoded as a stream in blocks
    of 1, then 3 latent frames."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan_src))
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red ball", "height": 32, "width": 48, "num_frames": 13, "num_inference_steps": 2}
    call["guidance_scale"] = 1.0

    def run(output_type: str) -> Any:
        return pipe(**call, output_type=output_type, generator=torch.Generator().manual_seed(0)).frames

    video, z = run("np")[0], run("latent")
    assert z.shape[2] == 4
    frames = streamed(StreamDecoder(pipe.vae), z, (1, 3))
    assert np.array_equal(postprocess(frames), (video * 255).round().astype("uint8"))


def test_a_wan22_patched_vae_streams_too() -> None:
    """Wan 2.2's VAE (residual blocks, 2×2 patches, 16× in space): a tiny random one."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
        latents_mean=[0.1 * i for i in range(8)], latents_std=[1.0 + 0.1 * i for i in range(8)],
    ).eval()  # fmt: skip
    z = latents(7, seed=14, channels=8, size=(4, 6))
    whole = whole_clip(vae, z)
    assert whole.shape == (25, 3, 64, 96)
    assert difference(streamed(StreamDecoder(vae), z, (1, 3, 3)), whole) <= TOLERANCE


def test_the_cache_is_the_size_cache_bytes_derives(vae: Any) -> None:
    stream = StreamDecoder(vae)
    streamed(stream, latents(2, seed=15), (1, 1))
    sizes = [stream.nbytes]
    stream.decode(latents(1, seed=16))
    sizes.append(stream.nbytes)
    assert sizes == [cache_bytes(vae, LATENT[0] * 8, LATENT[1] * 8)] * 2  # fixed from the second latent frame on
    import diffusers

    with torch.device("meta"):
        wan21 = diffusers.AutoencoderKLWan()  # Wan 2.1's VAE: the class's defaults
    values = 944_286_720
    assert cache_bytes(wan21, 480, 832) == values * 4  # float32
    print(f"Wan 2.1 VAE at 480 × 832: {values} cached values per stream, {values * 2 / 2**30:.2f} GiB in bfloat16")


def test_cost_of_decoding_by_blocks(vae: Any) -> None:
    """Prints (asserts nothing about) the time of a whole-clip decode of 1 + 3k latent frames against the same clip
    decoded by blocks, and of 4 streams' blocks one stream at a time against one batched call."""
    z, k = latents(1 + 3 * 4, seed=17), 4

    def timed(run: Any, repeats: int = 2) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return best

    whole = timed(lambda: whole_clip(vae, z))
    by_blocks = timed(lambda: streamed(StreamDecoder(vae), z, (1,) + (3,) * k))
    by_frames = timed(lambda: streamed(StreamDecoder(vae), z, (1,) * z.shape[2]))
    print(
        f"\ntiny VAE, {z.shape[2]} latent frames at {LATENT[0] * 8}×{LATENT[1] * 8}, one thread: whole clip "
        f"{whole * 1e3:.1f} ms; blocks of 1, then 3: {by_blocks * 1e3:.1f} ms ({by_blocks / (k + 1) * 1e3:.1f} ms "
        f"a block); blocks of 1: {by_frames * 1e3:.1f} ms"
    )
    blocks = [latents(3, seed=20 + i) for i in range(4)]

    def warm() -> list[StreamDecoder]:
        streams = [StreamDecoder(vae) for _ in blocks]
        for s in streams:
            s.decode(latents(2, seed=18))
        return streams

    one_by_one = timed(lambda: [s.decode(b) for s, b in zip(warm(), blocks, strict=True)])
    batched = timed(lambda: decode_streams(warm(), blocks))
    setup = timed(warm)
    print(
        f"4 streams' blocks of 3 latent frames: one by one {(one_by_one - setup) * 1e3:.1f} ms, "
        f"batched {(batched - setup) * 1e3:.1f} ms"
    )
