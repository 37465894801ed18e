"""The causal video denoiser: cached frame-by-frame inference equals the parallel training pass."""

from __future__ import annotations

import pytest
import torch

from fewstep.models.video import KVCache, VideoConfig, VideoDenoiser


def _net(cfg: VideoConfig, seed: int = 0) -> VideoDenoiser:
    torch.manual_seed(seed)
    net = VideoDenoiser(cfg).eval()
    with torch.no_grad():  # the output layer starts at zero; give every parameter a value that matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _inputs(cfg: VideoConfig, b: int, frames: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(b, frames, 3, cfg.size, cfg.size, generator=g)
    noisy = torch.randn(b, frames, 3, cfg.size, cfg.size, generator=g)
    t = torch.rand(b, frames, generator=g)
    states = torch.randn(b, 6, cfg.text_dim, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 4:] = False  # a shorter prompt in the second stream
    return clean, noisy, t, states, mask


@pytest.mark.parametrize(("sink", "window", "residual"), [(1, 3, False), (2, 2, False), (0, 4, False), (1, 3, True)])
def test_cached_inference_equals_the_parallel_pass_past_the_window(sink: int, window: int, residual: bool) -> None:
    cfg = VideoConfig(size=8, patch=4, dim=32, heads=2, layers=2, sink=sink, window=window, residual=residual)
    net = _net(cfg)
    frames = sink + window + 4  # long enough for the window to roll over
    clean, noisy, t, states, mask = _inputs(cfg, 2, frames)
    with torch.no_grad():
        parallel = net.forward_parallel(clean, noisy, t, states, mask)
        text = net.text_kv(states, mask)
        cache = KVCache.empty(cfg, 2)
        for f in range(frames):
            v = net.denoise(noisy[:, f], t[:, f], text, cache)
            torch.testing.assert_close(v, parallel[:, f], atol=1e-5, rtol=1e-4)
            net.write(clean[:, f], text, cache)
    assert cache.written.tolist() == [frames, frames]
    assert sorted(cache.frame_of[0].tolist()) == [*range(sink), *range(frames - window, frames)]


def test_a_residual_network_with_no_correction_predicts_the_previous_frame() -> None:
    cfg = VideoConfig(size=8, patch=4, dim=32, heads=2, layers=1, sink=1, window=2, residual=True)
    net = _net(cfg)
    with torch.no_grad():
        net.conv_out.weight.zero_()
        net.conv_out.bias.zero_()
    clean, noisy, t, states, mask = _inputs(cfg, 2, 3)
    with torch.no_grad():
        text = net.text_kv(states, mask)
        cache = KVCache.empty(cfg, 2)
        net.write(clean[:, 0], text, cache)
        v = net.denoise(noisy[:, 1], t[:, 1], text, cache)
        x0 = noisy[:, 1] - t[:, 1].view(-1, 1, 1, 1) * v
        torch.testing.assert_close(x0, clean[:, 0], atol=1e-5, rtol=1e-4)  # a copy of the last clean frame
        v_parallel = net.forward_parallel(clean, noisy, t, states, mask)
        x0_parallel = noisy - t[..., None, None, None] * v_parallel
        torch.testing.assert_close(x0_parallel[:, 1:], clean[:, :-1], atol=1e-5, rtol=1e-4)


def test_the_cache_has_one_shape_whatever_the_stream_length() -> None:
    cfg = VideoConfig(size=8, patch=4, dim=32, heads=2, layers=2, sink=1, window=2)
    net = _net(cfg)
    clean, noisy, t, states, mask = _inputs(cfg, 2, 12)
    with torch.no_grad():
        text = net.text_kv(states, mask)
        cache = KVCache.empty(cfg, 2)
        shape = cache.k.shape
        for f in range(12):
            net.denoise(noisy[:, f], t[:, f], text, cache)
            net.write(clean[:, f], text, cache)
            assert cache.k.shape == shape == (2, 2, 2, 3, cfg.tokens, 16)


def test_frames_out_of_the_window_are_not_attended_but_the_sink_is() -> None:
    # One layer and no pixel context: a cached frame's keys then depend on its own pixels only. (With more
    # layers, or frames as pixel context, a frame still reaches later ones through the frames in between.)
    cfg = VideoConfig(size=8, patch=4, dim=32, heads=2, layers=1, sink=1, window=2, context_frames=0)
    net = _net(cfg)
    clean, noisy, t, states, mask = _inputs(cfg, 2, 6)
    changed_mid = clean.clone()
    changed_mid[:, 2] += 1.0  # frame 2 is out of the window when frame 5 is made
    changed_sink = clean.clone()
    changed_sink[:, 0] += 1.0
    with torch.no_grad():
        base = net.forward_parallel(clean, noisy, t, states, mask)[:, 5]
        mid = net.forward_parallel(changed_mid, noisy, t, states, mask)[:, 5]
        sink = net.forward_parallel(changed_sink, noisy, t, states, mask)[:, 5]
    torch.testing.assert_close(mid, base)
    assert (sink - base).abs().max() > 1e-3
