"""The causal Wan stream engine adds no error: a session's frames are the whole-clip decode of the stream the runner
computes with no cache, for every family, alone or batched with a session at another block, across a prompt change
mid-block (a swap or a LongLive recache), in a slot another session used before.

On tiny versions of the tiny WanPipeline (`tests.pipelines.wan`, written as the import writes them:
`tests.causal_versions`): 32 × 32 pixel frames (4 × 4 latent, 4 tokens a frame), prompts of 32 tokens, streams of
at most 12 latent frames (45 pixel frames); LongLive runs with blocks of 2 frames seeing its sink and the block
before (`SMALL_WINDOW`), so its stream evicts from its third block on, and a switch after its third block re-encodes
past the window.
Frames are compared as served (uint8): a pixel may round the other way (the cached stream is the reference's to
within 1e-6), so the tolerance is one level.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines import wan_stream
from fewstep.engines.base import Frame, Session, StreamEngine, StreamRequest, stream_alone
from fewstep.engines.wan_stream import CausalVideo, WanStreamEngine, causal_video_spec
from fewstep.errors import CheckpointError, GenerationFailed, InvalidRequest, Overloaded
from fewstep.models.checkpoint import read_manifest
from fewstep.models.pipelines import postprocess
from fewstep.models.wan_causal import PromptKV, reference_stream
from fewstep.models.wan_vae import decode_streams
from tests.causal_versions import causal_version, family

pytestmark = pytest.mark.slow

FAMILIES = ("self-forcing", "causvid", "longlive")
RED, BOAT = "a red fox in the snow", "a  boat on a lake"


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def engines(wan_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WanStreamEngine]]:
    """A loaded engine of 2 slots per family."""
    out = {}
    root = tmp_path_factory.mktemp("versions")
    for name in FAMILIES:
        engine = WanStreamEngine(causal_version(wan_src, root / name, family(name)), capacity=2)
        engine.load()
        out[name] = engine
    yield out
    for engine in out.values():
        engine.close()


Got = dict[int, list[Frame]]
"""Each session's frames so far, by `id(session)`."""


def step(engine: WanStreamEngine, sessions: list[Session], got: Got) -> None:
    """One boundary; each frame checked on arrival: in order, and a block's frames all at the boundary that
    finished it (the last block's cut at the count asked for)."""
    before = {id(s): s.frame for s in sessions}
    frames = engine.advance(sessions)
    for s in sessions:
        mine = [f for f in frames if f.session is s]
        assert [f.index for f in mine] == list(range(before[id(s)], s.frame))
        if mine:
            first = mine[0].index == 0
            made = engine.video.pixel_frames(engine.family.block_frames) if first else 4 * engine.family.block_frames
            assert len(mine) == min(made, s.request.frames - mine[0].index)
            assert all(f.pixels.shape == (32, 32, 3) and f.pixels.dtype == np.uint8 for f in mine)
        got.setdefault(id(s), []).extend(mine)


def run(
    engine: WanStreamEngine, sessions: list[Session], got: Got, steer: dict[int, tuple[Session, str]] | None = None
) -> None:
    """Advance `sessions` together until all finish; `steer[k]` steers a session before the k-th boundary."""
    boundary = 0
    while not all(s.finished for s in sessions):
        if steer and boundary in steer:
            engine.steer(*steer[boundary])
        step(engine, sessions, got)
        boundary += 1


@dataclass
class Stream:
    """A stream's latents (C, frames, h, w) and its pixel frames, in [-1, 1] (frames, 3, H, W) and as served."""

    latents: torch.Tensor
    video: torch.Tensor
    frames: np.ndarray


Tap = dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]
"""What the engine decoded, by `id(decoder)`: its latent blocks and their pixel frames."""


@pytest.fixture
def tap(monkeypatch: pytest.MonkeyPatch) -> Tap:
    """Records every block the engine decodes (what it hands to the VAE and what comes back, before rounding)."""
    seen: Tap = {}
    held: list[Any] = []  # every decoder seen stays alive, so no later one takes its id

    def recording(streams: list[Any], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode_streams(streams, blocks)
        held.extend(streams)
        for stream, block, pixels in zip(streams, blocks, out, strict=True):
            latents, video = seen.setdefault(id(stream), ([], []))
            latents.append(block[0])
            video.append(pixels)
        return out

    monkeypatch.setattr(wan_stream, "decode_streams", recording)
    return seen


def made(s: Session, got: Got, tap: Tap) -> Stream:
    """Session `s`'s stream as the engine made it."""
    frames = got[id(s)]
    assert [f.index for f in frames] == list(range(s.request.frames))
    latents, video = tap[id(s.state.decoder)]
    return Stream(torch.cat(latents, dim=1), torch.cat(video)[: s.request.frames], np.stack([f.pixels for f in frames]))


@torch.no_grad()
def expected(engine: WanStreamEngine, seed: int, prompts: list[PromptKV], frames: int) -> Stream:
    """The stream of `len(prompts)` blocks (block b with `prompts[b]`) computed with no cache (`reference_stream`),
    its first `frames` pixel frames decoded whole as WanPipeline decodes its latents."""
    assert engine.runner is not None
    return decoded(engine, reference_stream(engine.runner, seed, prompts), frames)


@torch.no_grad()
def decoded(engine: WanStreamEngine, latents: torch.Tensor, frames: int) -> Stream:
    """Latents (C, frames, h, w) and their first `frames` pixel frames decoded whole as WanPipeline decodes."""
    vae = engine.vae
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)
    video = vae.decode(latents[None] / inverse_std + mean, return_dict=False)[0][0].permute(1, 0, 2, 3)
    video = video.clamp(-1, 1)[:frames]
    return Stream(latents, video, postprocess(video))


def same(got: Stream, want: Stream) -> None:
    """Equal to the rounding of batched kernels: latents and frames before rounding (the tiny random VAE shrinks a
    latent difference some 200-fold, so the latents are where an error shows), and frames as served."""
    assert got.latents.shape == want.latents.shape and got.video.shape == want.video.shape
    latent_gap = float((got.latents - want.latents).abs().max())
    pixel_gap = float((got.video - want.video).abs().max())
    served = np.abs(got.frames.astype(int) - want.frames.astype(int))
    print(f"latents {latent_gap:.2g}, frames {pixel_gap:.2g}, served {served.max()} ({(served > 0).mean():.2%} off)")
    assert latent_gap < 1e-4 and pixel_gap < 1e-5 and served.max() <= 1


def test_it_is_a_stream_engine_with_the_familys_spec(engines: dict[str, WanStreamEngine]) -> None:
    engine = engines["longlive"]
    assert isinstance(engine, StreamEngine)
    spec = engine.spec
    assert (spec.step_counts, spec.default_steps, spec.size, spec.capacity) == ((4,), 4, "32x32", 2)
    assert (spec.sink, spec.window, spec.max_frames) == (1, 5, 45)  # 6 whole blocks of 2 in 12 latent frames
    assert not spec.hybrid
    assert engines["causvid"].spec.step_counts == (3,) and engines["self-forcing"].spec.max_frames == 45
    assert causal_video_spec(engine.manifest, "1", 2) == spec  # a gateway reads the same spec from the manifest


def test_prompts_are_encoded_as_wan_pipeline_encodes_them(wan_src: Path, engines: dict[str, WanStreamEngine]) -> None:
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan_src))
    engine = engines["self-forcing"]
    assert engine.prompts is not None
    for prompt in (RED, BOAT, "x" * 100):  # extra spaces cleaned; a long one cut at 32 tokens
        with torch.no_grad():  # as the pipeline's `__call__` runs it (with autograd on, kernels round otherwise)
            want, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
        assert torch.equal(engine.prompts(prompt), want)
    assert engine.prompts(RED) is engine.prompts(RED)  # cached


@pytest.mark.parametrize("name", FAMILIES)
def test_a_streams_frames_are_the_whole_clip_decode_of_the_reference(
    engines: dict[str, WanStreamEngine], tap: Tap, name: str
) -> None:
    """The longest stream, and one whose count ends inside a block (its last block's later frames dropped)."""
    engine = engines[name]
    kv = engine.prompt_kv(RED)
    for frames in (engine.spec.max_frames, 14):
        s, got = engine.open(StreamRequest(RED, frames, engine.family.steps, 5)), {}
        try:
            run(engine, [s], got)
        finally:
            engine.end(s)
        same(made(s, got, tap), expected(engine, 5, [kv] * engine.video.blocks_for(frames), frames))


@pytest.mark.parametrize("name", ["self-forcing", "longlive"])
def test_two_sessions_batched_at_different_blocks_equal_each_alone(
    engines: dict[str, WanStreamEngine], tap: Tap, name: str
) -> None:
    engine = engines[name]
    first, got = engine.open(StreamRequest(RED, 21, engine.family.steps, 1)), {}
    try:
        for _ in range(engine.family.steps + 1):  # one block and a step of the next, alone
            step(engine, [first], got)
        second = engine.open(StreamRequest(BOAT, 21, engine.family.steps, 2))
        try:
            run(engine, [first, second], got)
        finally:
            engine.end(second)
    finally:
        engine.end(first)
    blocks = engine.video.blocks_for(21)
    same(made(first, got, tap), expected(engine, 1, [engine.prompt_kv(RED)] * blocks, 21))
    same(made(second, got, tap), expected(engine, 2, [engine.prompt_kv(BOAT)] * blocks, 21))


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_prompt_change_mid_block_steers_from_the_next_block(
    engines: dict[str, WanStreamEngine], tap: Tap, name: str, block: int
) -> None:
    """Steered one step into `block`: it and those before keep the first prompt, the rest take the new one by the
    family's policy (LongLive: the frames so far encoded again with it, sink included, while they fit its window;
    after block 2, past the window, the window after the sink)."""
    engine = engines[name]
    steps, frames = engine.family.steps, engine.spec.max_frames
    s, got = engine.open(StreamRequest(RED, frames, steps, 3)), {}
    try:
        run(engine, [s], got, steer={block * steps + 1: (s, BOAT)})
    finally:
        engine.end(s)
    assert s.prompt == BOAT
    red, boat = engine.prompt_kv(RED), engine.prompt_kv(BOAT)
    blocks = engine.video.blocks_for(frames)
    same(made(s, got, tap), expected(engine, 3, [red] * (block + 1) + [boat] * (blocks - block - 1), frames))
    unsteered = expected(engine, 3, [red] * blocks, frames)
    assert float((made(s, got, tap).latents - unsteered.latents).abs().max()) > 0.1


def test_past_capacity_is_overloaded_and_an_ended_sessions_slot_is_reused_clean(
    engines: dict[str, WanStreamEngine], tap: Tap
) -> None:
    engine = engines["longlive"]
    steps = engine.family.steps
    a = engine.open(StreamRequest(BOAT, 29, steps, 4))
    b = engine.open(StreamRequest(RED, 29, steps, 5))
    with pytest.raises(Overloaded, match="all 2 video sessions are taken"):
        engine.open(StreamRequest(RED, 5, steps, 6))
    got: Got = {}
    for _ in range(3 * steps + 2):  # both slots written past the window, a decoder cache each
        step(engine, [a, b], got)
    slot = a.state.slot
    engine.end(a)
    assert engine.active == 1 and a.closed and engine.advance([a]) == []
    c = engine.open(StreamRequest(RED, 29, steps, 5))  # b's stream again, in a's old slot
    try:
        assert c.state.slot == slot
        run(engine, [c], got)
        run(engine, [b], got)
    finally:
        engine.end(b)
        engine.end(c)
    assert engine.active == 0
    want = expected(engine, 5, [engine.prompt_kv(RED)] * 4, 29)
    same(made(c, got, tap), want)
    same(made(b, got, tap), want)


def test_a_session_whose_block_goes_non_finite_fails_alone_and_its_neighbour_streams_on(
    engines: dict[str, WanStreamEngine], tap: Tap
) -> None:
    """A poisoned session (its block in progress turned to NaN, as a numerical blow-up would leave it) fails at the
    boundary that finishes that block: its `error` says why, its slot is free, and the session batched beside it
    streams on, equal to its stream alone."""
    engine = engines["self-forcing"]
    steps = engine.family.steps
    bad = engine.open(StreamRequest(RED, 21, steps, 7))
    good = engine.open(StreamRequest(BOAT, 21, steps, 8))
    got: Got = {}
    try:
        step(engine, [bad, good], got)  # both blocks under way
        bad.state.block.x.fill_(float("nan"))
        while not bad.closed:
            step(engine, [bad, good], got)
        assert isinstance(bad.error, GenerationFailed) and "not finite" in str(bad.error)
        assert engine.active == 1 and engine.advance([bad]) == []
        run(engine, [good], got)
    finally:
        engine.end(bad)
        engine.end(good)
    assert engine.active == 0 and got[id(bad)] == []
    blocks = engine.video.blocks_for(21)
    same(made(good, got, tap), expected(engine, 8, [engine.prompt_kv(BOAT)] * blocks, 21))


def test_a_stream_alone_that_fails_raises_its_error(engines: dict[str, WanStreamEngine]) -> None:
    """What the warm-up and the gate's probes see of a network that blows up: the session's error, raised, and its
    slot freed."""
    engine = engines["causvid"]
    assert engine.runner is not None
    weight = engine.runner.model.proj_out.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(GenerationFailed, match="not finite"):
            stream_alone(engine, StreamRequest(RED, 5, engine.family.steps, 9))
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert engine.active == 0


def test_requests_past_the_models_bounds_are_refused(engines: dict[str, WanStreamEngine]) -> None:
    engine = engines["self-forcing"]
    with pytest.raises(InvalidRequest, match=r"`frames` must be between 1 and 45 \(the model's stream bound\)"):
        engine.open(StreamRequest(RED, 46, 4, 0))
    with pytest.raises(InvalidRequest, match=r"`steps` must be one of \[4\]. Given: 2"):
        engine.open(StreamRequest(RED, 5, 2, 0))
    with pytest.raises(InvalidRequest, match=r"`frames` must be between 1 and 45\. Given: 50"):
        engine.spec.validate(StreamRequest(RED, 50, 4, 0), max_frames=300)
    with pytest.raises(InvalidRequest, match="hybrid"):
        engine.open(StreamRequest(RED, 5, 4, 0, hybrid=True))
    assert engine.active == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "diffusers"}, "is not 'diffusers-causal-video'"),
        ({"causal": None}, "no causal family"),
        ({"causal": {"name": "x"}}, "no valid causal family"),
        ({"video": {"height": 32}}, "no valid `video` and `text` sections"),
        ({"video.height": 40}, "height must be a multiple of 16"),
        ({"video.width": 10**6}, "`width` must be an integer from 1 to 8192"),
        ({"video.max_frames": 1}, "shorter than one block of 3"),
        ({"video.fps": "fast"}, "`video.fps` must be a number"),
        ({"video.latent.patch": [1, 2]}, "`video.latent.patch` must be 3 integers"),
        ({"text": {"lengths": [16, 77]}}, "one length"),
    ],
)
def test_bad_manifests_are_refused(engines: dict[str, WanStreamEngine], change: dict[str, Any], message: str) -> None:
    manifest = read_manifest(engines["self-forcing"].folder)
    for key, value in change.items():
        *path, last = key.split(".")
        target = manifest
        for part in path:
            target = target[part]
        target[last] = value
    with pytest.raises(CheckpointError, match=message):
        CausalVideo.from_manifest(manifest)


def test_components_that_disagree_with_the_manifest_are_refused(wan_src: Path, tmp_path: Path) -> None:
    folder = causal_version(wan_src, tmp_path / "v", family("causvid"))
    manifest = read_manifest(folder)
    manifest["video"]["latent"]["spatial"] = 16
    manifest["video"]["height"] = manifest["video"]["width"] = 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    engine = WanStreamEngine(folder, capacity=1)
    with pytest.raises(CheckpointError, match=r"the spatial factor of the transformer \(8\), the VAE \(8\)"):
        engine.load()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_a_stream_is_the_cpu_streams(engines: dict[str, WanStreamEngine], dtype: str) -> None:
    """The served configuration (CUDA, bfloat16) makes the float32 CPU stream to within its precision, batched or
    alone. Not yet run: no GPU was lent to the task that wrote it (bfloat16 on CPU measured a mean difference of 0.95
    levels, 25 at most, on this tiny random model)."""
    cpu = engines["longlive"]
    cuda = WanStreamEngine(cpu.folder, capacity=2, device="cuda", dtype=dtype)
    cuda.load()
    cuda.warmup()
    try:
        streams: dict[str, np.ndarray] = {}
        for label, engine in (("cpu", cpu), ("cuda", cuda)):
            got: Got = {}
            a = engine.open(StreamRequest(RED, 45, 4, 1))
            b = engine.open(StreamRequest(BOAT, 45, 4, 2))
            try:
                step(engine, [a], got)
                run(engine, [a, b], got, steer={3: (a, BOAT)})
            finally:
                engine.end(a)
                engine.end(b)
            streams[label] = np.stack([f.pixels for f in got[id(a)]]).astype(int)
        gap = np.abs(streams["cpu"] - streams["cuda"])
        print(f"cuda {dtype} vs cpu float32: mean {gap.mean():.3f}, max {gap.max()} levels")
        assert gap.mean() < (0.1 if dtype == "float32" else 3.0)
    finally:
        cuda.close()
