"""The rolling runner (Rolling Forcing): its cache is exact and its schedule is the source's.

On the tiny Wan pipeline (`tests.pipelines.wan`: 2 blocks × 2 heads × 12, rotary positions for 32 latent frames)
with latent frames of 6 × 8 (12 tokens each), the family at test sizes (`SMALL`): the source's 5-step list, blocks
of 2 frames, a sink of one block and an attention bound of 14 frames (the source's 21 = 7 blocks of 3, here 7
blocks of 2), so a full window of 10 frames sees the sink and one earlier block, the sink rotated away from its
own frames from the window at block 3 on, and a clean re-run leaves the sink behind from block 7 on. A stream
served from the key/value cache equals the same stream recomputed with no cache (`rolling_reference`), batched
with other sessions at other calls, and across a prompt switch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fewstep.errors import CheckpointError
from fewstep.models.causal_families import CAUSAL_FAMILIES, CausalFamily
from fewstep.models.wan_causal import PromptKV
from fewstep.models.wan_rolling import RollingWan, rolling_reference
from tests.pipelines import wan

pytestmark = pytest.mark.slow

LATENT = (6, 8)
TOLERANCE = 1e-5
SMALL = {"block_frames": 2, "sink": 2, "window": 14}
BLOCKS = 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.Tensor]:
    """The tiny pipeline's transformer and three prompts' embeddings, as its text encoder gives them."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan(tmp_path_factory.mktemp("wan") / "wan")))
    prompts = ["a red fox in the snow", "a boat on a lake at night", "city traffic"]
    text, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    return pipe.transformer, text


def small() -> CausalFamily:
    return dataclasses.replace(CAUSAL_FAMILIES["rolling-forcing"], **SMALL)


def cached(runner: RollingWan, slot: int, seed: int, prompts: list[PromptKV], blocks: int) -> torch.Tensor:
    """A stream from the cache, one session alone, call c with `prompts[c]`."""
    out: list[torch.Tensor] = []
    for prompt in prompts:
        (finished,) = runner.advance([runner.next_block(slot, seed, prompt, blocks)])
        if finished is not None:
            out.append(finished)
    assert len(out) == blocks
    return torch.cat(out, dim=1)


def test_the_family_is_the_sources() -> None:
    """`configs/rolling_forcing_dmd.yaml`: [1000, 800, 600, 400, 200] warped with shift 5, 3 frames a block,
    `max_attention_size` 21 frames with a sink of the first block; the window of 5 blocks fills, rolls and
    drains; a full window from frame 15 sees the sink rotated to frames 9-11 and frames 12-14."""
    rf = CAUSAL_FAMILIES["rolling-forcing"]
    assert rf.timesteps == pytest.approx([1000.0, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    assert rf.sigmas == pytest.approx([1.0, 0.952381, 0.882353, 0.769231, 0.555556], abs=1e-6)
    assert (rf.block_frames, rf.sink, rf.window, rf.prompt_switch) == (3, 3, 21, "swap")
    assert [rf.rolling_window(c, 7) for c in range(11)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 6),
        (4, 6),
        (5, 6),
        (6, 6),
    ]
    assert rf.rolling_history(15, 15) == (12, 9)  # one block before the window, the sink just before it
    assert rf.rolling_history(3, 15) == (3, 0)  # nothing between the sink and the window: the sink at its own place
    assert rf.rolling_history(18, 3) == (3, 0)  # the last drain call sees 15 frames: all since the sink
    assert CausalFamily.from_dict(rf.to_dict()) == rf


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sampling": "diagonal"}, "`sampling` must be one of \\['block', 'rolling'\\]"),
        ({"positions": "absolute"}, "`sampling: rolling` goes with `positions: sink-shifted`"),
        ({"sampling": "block"}, "`sampling: rolling` goes with `positions: sink-shifted`"),
        ({"sink": 1}, "a rolling family's `sink` must be its first block \\(2 frames\\)"),
        ({"window": 11}, "`window` must be a multiple of its block \\(2\\) of at least 12"),
        ({"window": 10}, "`window` must be a multiple of its block \\(2\\) of at least 12"),
        ({"window": None}, "`window` must be a multiple"),
        ({"prompt_switch": "recache"}, "a rolling family's `prompt_switch` must be `swap`"),
    ],
)
def test_bad_rolling_family_data_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        CausalFamily.from_dict({**small().to_dict(), **change})


def test_a_cached_stream_equals_the_stream_recomputed_without_a_cache(tiny: tuple[Any, torch.Tensor]) -> None:
    """Every block of a 9-block stream (13 calls): past the window, the sink shifted, the clean re-runs past the
    attention bound; and a stream shorter than the window."""
    model, text = tiny
    runner = RollingWan(model, small(), slots=1, max_frames=20, latent=LATENT)
    prompt = runner.prompt(text[:1])
    for blocks in (BLOCKS, 3):
        runner.reset(0)
        calls = blocks + runner.family.steps - 1
        got = cached(runner, 0, 7, [prompt] * calls, blocks)
        want = rolling_reference(runner, 7, [prompt] * calls, blocks)
        gap = float((got - want).abs().max())
        print(f"{blocks} blocks: {gap:.2g}")
        assert gap < TOLERANCE
    assert runner.windows[0] is not None and runner.windows[0].done


def test_the_comparison_sees_where_the_sink_sits(
    tiny: tuple[Any, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: a runner that leaves the sink at its own frames agrees up to block 2 (its windows see
    the sink there anyway) and departs from the reference once the sink moves."""
    model, text = tiny
    runner = RollingWan(model, small(), slots=1, max_frames=20, latent=LATENT)
    prompt = runner.prompt(text[:1])
    calls = BLOCKS + runner.family.steps - 1
    want = rolling_reference(runner, 3, [prompt] * calls, BLOCKS)
    shifted = CausalFamily.rolling_history

    def unshifted(self: CausalFamily, first: int, frames: int) -> tuple[int, int]:
        return shifted(self, first, frames)[0], 0

    monkeypatch.setattr(CausalFamily, "rolling_history", unshifted)
    got = cached(runner, 0, 3, [prompt] * calls, BLOCKS)
    assert (got[:, :6] - want[:, :6]).abs().max() < TOLERANCE
    assert (got[:, 6:] - want[:, 6:]).abs().max() > 1e-3


def test_sessions_batched_at_different_calls_equal_each_alone(tiny: tuple[Any, torch.Tensor]) -> None:
    """Three sessions of different lengths start at different calls and share every call (filling, rolling and
    draining windows in one batch); each equals itself alone. A slot reset for a new session serves it fresh."""
    model, text = tiny
    family = small()
    runner = RollingWan(model, family, slots=3, max_frames=20, latent=LATENT)
    prompts = [runner.prompt(text[i : i + 1]) for i in range(3)]
    sessions = {0: (11, 0, 8), 1: (12, 3, 4), 2: (13, 6, 6)}  # slot: (seed, the call it starts at, blocks)
    outs: dict[int, list[torch.Tensor]] = {slot: [] for slot in sessions}
    phases = set()
    for call in range(30):
        live = [slot for slot, (_, start, blocks) in sessions.items() if call >= start and len(outs[slot]) < blocks]
        if not live:
            break
        states = [runner.next_block(slot, sessions[slot][0], prompts[slot], sessions[slot][2]) for slot in live]
        phases.add(tuple(sorted(s.x.shape[1] for s in states)))
        for slot, finished in zip(live, runner.advance(states), strict=True):
            if finished is not None:
                outs[slot].append(finished)
    assert all(len(outs[slot]) == blocks for slot, (_, _, blocks) in sessions.items())
    assert len(phases) > 3
    for slot, (seed, _, blocks) in sessions.items():
        alone = RollingWan(model, family, slots=1, max_frames=20, latent=LATENT)
        want = cached(alone, 0, seed, [prompts[slot]] * (blocks + family.steps - 1), blocks)
        assert (torch.cat(outs[slot], dim=1) - want).abs().max() < TOLERANCE
    runner.reset(1)
    again = cached(runner, 1, 12, [prompts[1]] * (4 + family.steps - 1), 4)
    assert (again - torch.cat(outs[1], dim=1)).abs().max() < TOLERANCE


@pytest.mark.parametrize("switch", [2, 8])
def test_a_prompt_switch_swaps_from_the_next_call(tiny: tuple[Any, torch.Tensor], switch: int) -> None:
    """A swap at call 2 (the window filling: its blocks in progress take the new prompt) and at call 8 (rolling,
    past the shift): equal to the reference with the switch, and not to the stream without it."""
    model, text = tiny
    runner = RollingWan(model, small(), slots=1, max_frames=20, latent=LATENT)
    before, after = runner.prompt(text[:1]), runner.prompt(text[1:2])
    calls = BLOCKS + runner.family.steps - 1
    prompts = [before] * switch + [after] * (calls - switch)
    got = cached(runner, 0, 5, prompts, BLOCKS)
    assert (got - rolling_reference(runner, 5, prompts, BLOCKS)).abs().max() < TOLERANCE
    assert (got - rolling_reference(runner, 5, [before] * calls, BLOCKS)).abs().max() > 1e-3


def test_the_runner_refuses_what_it_cannot_serve(tiny: tuple[Any, torch.Tensor]) -> None:
    model, text = tiny
    runner = RollingWan(model, small(), slots=2, max_frames=20, latent=LATENT)
    prompt = runner.prompt(text[:1])
    with pytest.raises(ValueError, match=r"1 to 10 blocks\. Given: 11"):
        runner.next_block(0, 1, prompt, 11)
    with pytest.raises(ValueError, match=r"1 to 10 blocks\. Given: None"):
        runner.next_block(0, 1, prompt)
    with pytest.raises(ValueError, match="advances the windows its `next_block` made"):
        runner.advance([dataclasses.replace(runner.next_block(0, 1, prompt, 1))])
    state = runner.next_block(1, 1, prompt, 1)
    for _ in range(runner.family.steps):
        runner.advance([state])
    with pytest.raises(ValueError, match="slot 1's stream of 1 blocks is finished"):
        runner.advance([state])
    with pytest.raises(ValueError, match="does not sample a rolling window"):
        RollingWan(model, CAUSAL_FAMILIES["self-forcing"], slots=1, max_frames=6, latent=LATENT)
    with pytest.raises(ValueError, match="does not recache"):
        runner.recache(0, torch.zeros(16, 2, *LATENT), prompt)


def test_cache_memory_per_slot_at_wan_1_3b_sizes() -> None:
    """Wan2.1-T2V-1.3B in bfloat16 at 480 × 832 (1560 tokens a frame): a slot holds the sink and the 18 frames a
    clean re-run sees before its block, 21 frames (the source's cache has 24 rows: these and the block's own)."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096
        ).to(torch.bfloat16)
    runner = RollingWan(model, CAUSAL_FAMILIES["rolling-forcing"], slots=1, max_frames=126, latent=(60, 104))
    assert (runner.positions, runner.cache_bytes) == (21, 21 * 287_539_200)  # 5.6 GiB a slot
