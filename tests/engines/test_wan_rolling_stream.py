"""The causal Wan stream engine serves a Rolling Forcing student: a session's frames are the whole-clip decode of
the stream the rolling runner's reference computes with no cache, alone, batched with a session at another point of
its stream, and across a prompt change.

On the tiny WanPipeline (`tests.pipelines.wan`) written as the import writes it (`tests.causal_versions`): 32 × 32
pixel frames (4 × 4 latents), streams of at most 16 latent frames (61 pixel frames); the family at test sizes
(`tests/models/test_wan_rolling.py`): the source's 5 steps, blocks of 2 frames, an attention bound of 14 frames, so
the longest stream (8 blocks) shifts its sink from block 3 on and re-runs block 7 past the bound. A block's frames
leave when it leaves the window: the first after 5 boundaries, then one block a boundary, the window draining at
the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewstep.engines.base import StreamRequest
from fewstep.engines.wan_stream import WanStreamEngine
from fewstep.models.causal_families import CAUSAL_FAMILIES
from fewstep.models.wan_causal import PromptKV
from fewstep.models.wan_rolling import RollingWan, rolling_reference
from tests.causal_versions import causal_version
from tests.engines.test_wan_stream import BOAT, RED, Stream, Tap, decoded, made, run, same, step, tap, wan_src

pytestmark = pytest.mark.slow

SMALL = {"block_frames": 2, "sink": 2, "window": 14}
__all__ = ["tap", "wan_src"]  # fixtures shared with the block-causal engine's tests


@pytest.fixture(scope="module")
def engine(wan_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WanStreamEngine]:
    family = dataclasses.replace(CAUSAL_FAMILIES["rolling-forcing"], **SMALL)
    folder = causal_version(wan_src, tmp_path_factory.mktemp("versions") / "rf", family, max_frames=16)
    engine = WanStreamEngine(folder, capacity=2)
    engine.load()
    yield engine
    engine.close()


def expected(engine: WanStreamEngine, seed: int, prompts: list[PromptKV], frames: int) -> Stream:
    """The stream of `frames` pixel frames, call c with `prompts[c]`, computed with no cache."""
    assert engine.runner is not None
    blocks = engine.video.blocks_for(frames)
    assert len(prompts) == blocks + engine.family.steps - 1
    return decoded(engine, rolling_reference(engine.runner, seed, prompts, blocks), frames)


def test_a_streams_frames_are_the_whole_clip_decode_of_the_reference(engine: WanStreamEngine, tap: Tap) -> None:
    """The longest stream, one shorter than the window (14 frames: 2 blocks) and one block (the warm-up's);
    nothing leaves before the window has filled."""
    assert isinstance(engine.runner, RollingWan)
    assert (engine.spec.step_counts, engine.spec.sink, engine.spec.window, engine.spec.max_frames) == ((5,), 2, 14, 61)
    kv = engine.prompt_kv(RED)
    for frames in (engine.spec.max_frames, 14, 5):
        s, got = engine.open(StreamRequest(RED, frames, 5, 5)), {}
        try:
            for _ in range(4):
                step(engine, [s], got)
            assert s.frame == 0
            run(engine, [s], got)
        finally:
            engine.end(s)
        blocks = engine.video.blocks_for(frames)
        same(made(s, got, tap), expected(engine, 5, [kv] * (blocks + 4), frames))


def test_two_sessions_batched_at_different_points_equal_each_alone(engine: WanStreamEngine, tap: Tap) -> None:
    first, got = engine.open(StreamRequest(RED, 41, 5, 1)), {}
    try:
        for _ in range(6):  # two blocks out, alone
            step(engine, [first], got)
        second = engine.open(StreamRequest(BOAT, 29, 5, 2))
        try:
            run(engine, [first, second], got)
        finally:
            engine.end(second)
    finally:
        engine.end(first)
    for s, prompt, seed, frames in ((first, RED, 1, 41), (second, BOAT, 2, 29)):
        calls = engine.video.blocks_for(frames) + 4
        same(made(s, got, tap), expected(engine, seed, [engine.prompt_kv(prompt)] * calls, frames))


@pytest.mark.parametrize(("boundary", "call"), [(2, 5), (6, 6)])
def test_a_prompt_change_takes_the_window_after_the_next_block(
    engine: WanStreamEngine, tap: Tap, boundary: int, call: int
) -> None:
    """Steered before `boundary`: the window takes the new prompt from the call after its next finished block
    (while it fills, the call after the first block leaves)."""
    frames = engine.spec.max_frames
    s, got = engine.open(StreamRequest(RED, frames, 5, 3)), {}
    try:
        run(engine, [s], got, steer={boundary: (s, BOAT)})
    finally:
        engine.end(s)
    assert s.prompt == BOAT
    calls = engine.video.blocks_for(frames) + 4
    red, boat = engine.prompt_kv(RED), engine.prompt_kv(BOAT)
    same(made(s, got, tap), expected(engine, 3, [red] * call + [boat] * (calls - call), frames))
    unsteered = expected(engine, 3, [red] * calls, frames)
    assert float((made(s, got, tap).latents - unsteered.latents).abs().max()) > 0.1


def test_warm_up_and_a_reused_slot(engine: WanStreamEngine, tap: Tap) -> None:
    """The warm-up streams one block; a slot used before serves a new stream fresh."""
    engine.warmup()
    kv = engine.prompt_kv(BOAT)
    for _ in range(2):
        s, got = engine.open(StreamRequest(BOAT, 21, 5, 9)), {}
        try:
            run(engine, [s], got)
        finally:
            engine.end(s)
        same(made(s, got, tap), expected(engine, 9, [kv] * (engine.video.blocks_for(21) + 4), 21))
