"""The AnyFlow FAR stream engine adds no error: a session's frames are `AnyFlowFARPipeline`'s video for the same
prompt, step count and starting noise (its latents within 1e-5, its frames within 2/255), alone or batched with
sessions at other chunks and step counts, for a stream shorter than the clip, across a prompt change (the pipeline
with a step-end callback handing back the new prompt at the chunk's last step); a session that goes non-finite
fails alone; the causal kind picks this engine by the manifest's family.

On a tiny AnyFlowFARPipeline (`tests.anyflow`) imported by `import_far`: 32 × 32 pixel frames (4 × 4 latent: 4
full tokens and 1 compressed a frame), chunks (1, 2, 1, 2) with 2 at full resolution (from chunk 2 on, chunk 0 is
seen compressed), 6 latent frames (21 pixel frames), prompts of 16 tokens.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines import far_stream
from fewstep.engines.base import Frame, Session, StreamRequest, stream_alone
from fewstep.engines.far_stream import FARStreamEngine, FARVideo, far_video_spec
from fewstep.errors import CheckpointError, GenerationFailed, InvalidRequest, Overloaded
from fewstep.models.anyflow_far import clip_noise
from fewstep.models.checkpoint import read_manifest
from fewstep.models.importing import import_far
from fewstep.models.registry import Registry
from fewstep.models.wan_vae import decode_streams
from fewstep.service.kinds import causal_streams

pytestmark = pytest.mark.slow

PARTITION = (1, 2, 1, 2)
SIDE, LATENT, TOKENS = 32, 4, 16
FRAMES = 21
"""Pixel frames of the whole partition: 1 + 4 · 5."""
RED, BOAT = "a red fox in the snow", "a boat on a lake"


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # flex attention without torch.compile says so on every call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.anyflow import anyflow_far

    return anyflow_far(tmp_path_factory.mktemp("anyflow") / "far", chunk_partition=PARTITION, full_chunk_limit=2)


@pytest.fixture(scope="module")
def version(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    name, number = import_far(src, "tiny-far", registry, size=(SIDE, SIDE), max_tokens=TOKENS)
    return registry.version_dir(name, number)


@pytest.fixture(scope="module")
def engine(version: Path) -> Iterator[FARStreamEngine]:
    engine = FARStreamEngine(version, capacity=3)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def pipe(src: Path) -> Any:
    import diffusers

    pipe = diffusers.AnyFlowFARPipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chunks_for(frames: int) -> tuple[int, ...]:
    """The partition's first chunks that cover `frames` pixel frames."""
    latent = 1 + math.ceil((frames - 1) / 4)
    return next(PARTITION[: k + 1] for k in range(len(PARTITION)) if sum(PARTITION[: k + 1]) >= latent)


def reference(pipe: Any, prompt: str, seed: int, steps: int, output: str, frames: int = FRAMES) -> Any:
    """The pipeline's clip of the chunks that cover `frames`, every chunk started from the session's noise: its
    latents (1, C, F, h, w) or its first `frames` frames (F, H, W, 3) in [0, 1]."""
    chunks = chunks_for(frames)
    out = pipe(
        prompt=prompt,
        height=SIDE,
        width=SIDE,
        num_frames=1 + 4 * (sum(chunks) - 1),
        num_inference_steps=steps,
        latents=clip_noise(seed, chunks, 16, LATENT, LATENT),
        max_sequence_length=TOKENS,
        chunk_partition=list(chunks),
        output_type=output,
    ).frames
    return out if output == "latent" else out[0][:frames]


Tap = dict[int, list[torch.Tensor]]
"""The latent chunks the engine decoded, by `id(decoder)`."""


@pytest.fixture
def tap(monkeypatch: pytest.MonkeyPatch) -> Tap:
    seen: Tap = {}
    held: list[Any] = []  # every decoder seen stays alive, so no later one takes its id

    def recording(streams: list[Any], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        held.extend(streams)
        for stream, block in zip(streams, blocks, strict=True):
            seen.setdefault(id(stream), []).append(block)
        return decode_streams(streams, blocks)

    monkeypatch.setattr(far_stream, "decode_streams", recording)
    return seen


def pixels(frames: list[Frame]) -> np.ndarray:
    assert [f.index for f in frames] == list(range(len(frames)))
    return np.stack([f.pixels for f in frames]).astype(np.float64) / 255.0


def run(engine: FARStreamEngine, sessions: list[Session], joins: list[int]) -> dict[int, list[Frame]]:
    """Advance the sessions together, session i from boundary `joins[i]` on, until all finish: each one's frames.
    A chunk's frames come together, at the boundary that finished it."""
    got: dict[int, list[Frame]] = {id(s): [] for s in sessions}
    boundary = 0
    while not all(s.finished for s in sessions):
        live = [s for s, j in zip(sessions, joins, strict=True) if j <= boundary and not s.finished]
        for f in engine.advance(live):
            got[id(f.session)].append(f)
        boundary += 1
    for s in sessions:
        engine.end(s)
    return got


@pytest.mark.parametrize("steps", [1, 4])
def test_a_session_is_the_pipelines_video(engine: FARStreamEngine, pipe: Any, tap: Tap, steps: int) -> None:
    session = engine.open(StreamRequest(RED, FRAMES, steps, 3))
    frames = run(engine, [session], [0])[id(session)]
    latents = torch.cat(tap[id(session.state.decoder)], dim=2)
    expected = reference(pipe, RED, 3, steps, "latent")
    diff = (latents - expected).abs().max().item()
    video = reference(pipe, RED, 3, steps, "np")
    print(f"\n{steps} steps: latents {diff:.2e}, frames {np.abs(pixels(frames) - video).max() * 255:.2f}/255")
    assert latents.shape == expected.shape == (1, 16, sum(PARTITION), LATENT, LATENT)
    assert diff <= 1e-5
    assert pixels(frames).shape == video.shape == (FRAMES, SIDE, SIDE, 3)
    assert np.abs(pixels(frames) - video).max() <= 2 / 255
    assert [len(c[0, 0]) for c in tap[id(session.state.decoder)]] == list(PARTITION)


def test_sessions_at_other_chunks_and_steps_share_calls_and_are_each_alone(engine: FARStreamEngine) -> None:
    rows: list[int] = []
    assert engine.runner is not None
    hook = engine.runner.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    specs = [(RED, 7, 2), (BOAT, 9, 2), ("a white table", 11, 1)]
    try:
        sessions = [engine.open(StreamRequest(p, FRAMES, steps, seed)) for p, seed, steps in specs]
        got = run(engine, sessions, [0, 2, 3])  # the second joins a chunk behind, the third two
    finally:
        hook.remove()
    assert max(rows) >= 2, "sessions at one chunk shared no call"
    for (prompt, seed, steps), s in zip(specs, sessions, strict=True):
        alone = stream_alone(engine, StreamRequest(prompt, FRAMES, steps, seed))
        assert np.array_equal(pixels(got[id(s)]), pixels(alone)), (prompt, seed, steps)


def test_a_short_stream_runs_the_chunks_it_needs(engine: FARStreamEngine, pipe: Any) -> None:
    """10 pixel frames are 4 latent frames: chunks 0, 1 and 2 (the third cut at its first 1 of 4 frames)."""
    frames = stream_alone(engine, StreamRequest(BOAT, 10, 2, 5))
    assert engine.video.partition_for(10) == (1, 2, 1)
    assert np.abs(pixels(frames) - reference(pipe, BOAT, 5, 2, "np", frames=10)).max() <= 2 / 255


def test_a_prompt_change_takes_effect_from_the_cache_step_after_the_chunk(engine: FARStreamEngine, pipe: Any) -> None:
    """Steered after its first step of chunk 1 (of 2 steps): chunk 1 keeps the first prompt; its cache step and
    chunks 2 and 3 take the new one. The reference: the pipeline with the transformer's text input replaced from
    chunk 1's cache step on (its sixth call: two steps and a cache step per chunk)."""
    session = engine.open(StreamRequest(RED, FRAMES, 2, 4))
    frames: list[Frame] = []
    boundary = 0
    while not session.finished:
        if boundary == 3:  # chunk 0 took boundaries 0 and 1; chunk 1 began at 2
            engine.steer(session, BOAT)
        frames += engine.advance([session])
        assert session.prompt == (RED if boundary < 3 else BOAT)  # chunk 1 finished at boundary 3: switched
        boundary += 1
    engine.end(session)

    with torch.no_grad():
        boat, _ = pipe.encode_prompt(BOAT, do_classifier_free_guidance=False, max_sequence_length=TOKENS)
    calls: list[int] = []

    def switched(_module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        calls.append(1)
        if len(calls) >= 6:
            kwargs["encoder_hidden_states"] = boat
        return args, kwargs

    hook = pipe.transformer.register_forward_pre_hook(switched, with_kwargs=True)
    try:
        expected = reference(pipe, RED, 4, 2, "np")
    finally:
        hook.remove()
    assert len(calls) == 4 * 2 + 3
    assert np.abs(pixels(frames) - expected).max() <= 2 / 255
    assert np.abs(pixels(frames) - reference(pipe, RED, 4, 2, "np")).max() > 2 / 255  # the change did something


def test_a_non_finite_session_fails_alone(engine: FARStreamEngine) -> None:
    bad, good = (engine.open(StreamRequest(p, FRAMES, 2, 6)) for p in (RED, BOAT))
    got: list[Frame] = []
    got += engine.advance([bad, good])
    bad.state.far.latents.fill_(float("nan"))  # the second step of chunk 0 finishes it, non-finite
    got += engine.advance([bad, good])
    assert isinstance(bad.error, GenerationFailed) and bad.closed and engine.active == 1
    while not good.finished:
        got += engine.advance([bad, good])
    engine.end(good)
    assert good.error is None and all(f.session is good for f in got)
    alone = stream_alone(engine, StreamRequest(BOAT, FRAMES, 2, 6))
    assert np.array_equal(pixels(got), pixels(alone))


def test_requests_past_the_models_bounds_and_capacity_are_refused(engine: FARStreamEngine) -> None:
    for request, names in (
        (StreamRequest(RED, FRAMES + 1, 4, 0), "`frames` must be between 1 and 21"),
        (StreamRequest(RED, 5, 9, 0), "`steps` must be between 1 and 8. Given: 9"),
    ):
        with pytest.raises(InvalidRequest, match=names):
            engine.open(request)
    sessions = [engine.open(StreamRequest(RED, 5, 1, i)) for i in range(engine.capacity)]
    with pytest.raises(Overloaded, match="video_max_sessions"):
        engine.open(StreamRequest(RED, 5, 1, 9))
    engine.end(sessions[0])
    engine.end(engine.open(StreamRequest(RED, 5, 1, 9)))
    for s in sessions[1:]:
        engine.end(s)
    assert engine.active == 0


def test_the_spec_and_the_kinds_table(version: Path) -> None:
    manifest = read_manifest(version)
    spec = far_video_spec(manifest, "1", 3)
    assert spec.step_counts == tuple(range(1, 9)) and spec.default_steps == 4
    assert (spec.size, spec.max_frames, spec.capacity, spec.sink, spec.window) == ("32x32", FRAMES, 3, 0, 6)
    assert causal_streams(manifest).engine is FARStreamEngine
    for broken, names in (
        ({"causal": {**manifest["causal"], "chunk_partition": [1, 2, 0]}}, "chunk_partition"),
        ({"causal": {**manifest["causal"], "default_steps": 9}}, "default_steps"),
        ({"video": {**manifest["video"], "max_frames": 7}}, "partition's 6 latent frames"),
        ({"causal": {**manifest["causal"], "extra": 1}}, "unknown fields"),
    ):
        with pytest.raises(CheckpointError, match=names):
            FARVideo.from_manifest({**manifest, **broken})


def test_a_manifest_that_disagrees_with_the_transformer_is_refused_at_load(version: Path, tmp_path: Path) -> None:
    folder = tmp_path / "edited"
    shutil.copytree(version, folder)
    manifest = read_manifest(folder)
    manifest["causal"]["chunk_partition"] = [1, 2, 3]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    engine = FARStreamEngine(folder, capacity=1)
    with pytest.raises(
        CheckpointError, match=r"chunk partition of the transformer \(\(1, 2, 1, 2\)\) and the manifest"
    ):
        engine.load()
