"""The causal Wan runner: its forward is the model's, its cache is exact, its families are the sources'.

On the tiny Wan pipeline (`tests.pipelines.wan`: 2 blocks × 2 heads × 12, rotary positions for 32 latent frames)
with latent frames of 6 × 8 (12 tokens each): a stream served from the key/value cache equals the same stream
recomputed with no cache (`ReferenceStream`: one forward over the history under an attention mask) for every
family, past its window, batched with other sessions at other blocks and steps, and across a prompt switch.
Windowed families run here with blocks of 2 frames, a window of 6 and a sink of 1 (the cache holds the sink and
3 frames), so a 7-block stream evicts from its third block on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fewstep.errors import CheckpointError
from fewstep.models.causal_families import CAUSAL_FAMILIES, CausalFamily
from fewstep.models.wan_causal import CausalWan, PromptKV, rope_at
from fewstep.models.wan_causal import reference_stream as reference
from tests.pipelines import wan

pytestmark = pytest.mark.slow

LATENT = (6, 8)
TOLERANCE = 1e-4  # measured: at most 7.2e-7 between the cached and the reference streams (float32, CPU; |x| ≤ 4)
SMALL_WINDOW = {"block_frames": 2, "window": 6, "sink": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.Tensor]:
    """The tiny pipeline's transformer and three prompts' embeddings, as its text encoder gives them."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan(tmp_path_factory.mktemp("wan") / "wan")))
    prompts = ["a red fox in the snow", "a boat on a lake at night", "city traffic"]
    text, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    return pipe.transformer, text


def family(name: str) -> CausalFamily:
    """`name` as served, with the test's small window where it has one."""
    f = CAUSAL_FAMILIES[name]
    return dataclasses.replace(f, **SMALL_WINDOW) if f.window is not None else f


def cached(runner: CausalWan, slot: int, seed: int, prompts: list[PromptKV]) -> torch.Tensor:
    """A stream of `len(prompts)` blocks from the cache, one session alone, as an engine drives it."""
    out: list[torch.Tensor] = []
    for block, prompt in enumerate(prompts):
        if block and prompt is not prompts[block - 1] and runner.family.prompt_switch == "recache":
            first, end = runner.family.recache_span(runner.committed[slot], runner.max_frames)
            runner.recache(slot, torch.cat(out, dim=1)[:, first:end], prompt)
        state, finished = runner.next_block(slot, seed, prompt), None
        while finished is None:
            (finished,) = runner.advance([state])
        out.append(finished)
    return torch.cat(out, dim=1)


def test_the_runner_is_the_models_forward(tiny: tuple[Any, torch.Tensor]) -> None:
    """With an empty cache and one block at frame 0, the runner's prediction is `WanTransformer3DModel.forward`'s
    (per-row or per-frame timesteps), and the model still runs its own forward afterwards."""
    model, text = tiny
    x = torch.randn(2, 16, 3, *LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([937.5, 250.0])
    want = model(x, t, text[:2]).sample
    runner = CausalWan(model, CAUSAL_FAMILIES["self-forcing"], slots=2, max_frames=9, latent=LATENT)
    prompts = runner.prompt(text[:2])
    assert (runner.denoise([0, 1], x, t, prompts, [0, 0]) - want).abs().max() < 1e-5  # measured: bit-equal
    per_frame = t[:, None].expand(2, 3)
    assert (runner.denoise([0, 1], x, per_frame, prompts, [0, 0]) - want).abs().max() < 1e-5  # measured 7e-7
    assert torch.equal(model(x, t, text[:2]).sample, want)


def test_rotary_tables_at_an_absolute_frame_are_the_models_shifted(tiny: tuple[Any, torch.Tensor]) -> None:
    """Frames k … k+F-1 are rotated as the model rotates those frames of a video that starts at frame 0."""
    model, _ = tiny
    k, f, tokens = 5, 3, (LATENT[0] // 2) * (LATENT[1] // 2)
    cos, sin = model.rope(torch.zeros(1, 16, k + f, *LATENT))
    got_cos, got_sin = rope_at(model.rope, torch.arange(k, k + f)[None], (LATENT[0] // 2, LATENT[1] // 2))
    assert torch.equal(got_cos, cos[:, k * tokens :]) and torch.equal(got_sin, sin[:, k * tokens :])
    assert not torch.equal(got_cos, cos[:, : f * tokens])


def test_families_are_the_sources_numbers() -> None:
    sf, causvid, longlive = (CAUSAL_FAMILIES[n] for n in ("self-forcing", "causvid", "longlive"))
    assert sf.timesteps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    assert sf.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    assert causvid.timesteps == (1000.0, 757.0, 522.0)  # unwarped: the list is the timestep
    assert causvid.sigmas == pytest.approx([1.0, 0.756757, 0.521739], abs=1e-6)  # the shift-8 table's nearest
    assert (sf.block_frames, sf.window, sf.sink, sf.prompt_switch) == (3, None, 0, "swap")
    assert (longlive.window, longlive.sink, longlive.prompt_switch) == (12, 3, "recache")
    # LongLive's block at frames 12–14 sees its sink 0–2 and the 6 frames before it (`local_attn_size` 12).
    frames = torch.arange(12)
    assert frames[longlive.sees(frames, torch.tensor(15), 12)].tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert longlive.recache_span(9, 240) == (0, 9)  # the stream fits the window: all of it, sink too
    assert longlive.recache_span(30, 240) == (21, 30)  # past it: the window after the sink
    for f in CAUSAL_FAMILIES.values():
        assert CausalFamily.from_dict(f.to_dict()) == f


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_frames": 0}, "`block_frames` must be an integer from 1 to 16"),
        ({"block_frames": True}, "`block_frames` must be an integer"),
        ({"denoising_steps": [1000, 750, 750]}, "`denoising_steps` must decrease"),
        ({"denoising_steps": [1001, 500]}, "`denoising_steps` must be an integer from 1 to 1000"),
        ({"denoising_steps": []}, "`denoising_steps` must list 1 to 16"),
        ({"denoising_steps": list(range(1000, 0, -50))}, "`denoising_steps` must list 1 to 16"),
        ({"denoising_steps": "1000"}, "no valid causal family"),
        ({"shift": float("nan")}, "`shift` must be a number in"),
        ({"shift": 0}, "`shift` must be a number in"),
        ({"warp": 1}, "`warp` must be true or false"),
        ({"window": 2}, "`window` must be an integer from 3 to 1024"),  # under block + sink
        ({"window": 10**6}, "`window` must be an integer from 3 to 1024"),
        ({"sink": -1}, "`sink` must be an integer from 0"),
        ({"context_timestep": 1000}, "`context_timestep` must be an integer from 0 to 999"),
        ({"prompt_switch": "lerp"}, "`prompt_switch` must be one of \\['swap', 'recache'\\]"),
        ({"positions": "relative"}, "`positions` must be one of"),
        ({"update": "ode"}, "`update` must be one of"),
        ({"name": ""}, "`name` must be text"),
        ({"surprise": 1}, "unknown fields"),
    ],
)
def test_bad_family_data_is_refused(change: dict[str, Any], message: str) -> None:
    data = {**CAUSAL_FAMILIES["longlive"].to_dict(), **SMALL_WINDOW, **change}
    with pytest.raises(CheckpointError, match=message):
        CausalFamily.from_dict(data)


@pytest.mark.parametrize("name", ["self-forcing", "causvid", "longlive"])
def test_a_cached_stream_equals_the_stream_recomputed_without_a_cache(
    tiny: tuple[Any, torch.Tensor], name: str
) -> None:
    """Block by block, up to block 6 (past the window: the windowed cache has evicted 9 frames by then)."""
    model, text = tiny
    runner = CausalWan(model, family(name), slots=1, max_frames=21, latent=LATENT)
    prompt = runner.prompt(text[:1])
    got, want = cached(runner, 0, 7, [prompt] * 7), reference(runner, 7, [prompt] * 7)
    assert (got - want).abs().max() < TOLERANCE
    if runner.family.window is not None:
        assert runner.frame_of[0].tolist() == [0, 13, 11, 12]  # the sink, then the ring: frame f at 1 + (f - 1) % 3


def test_the_comparison_sees_the_window(tiny: tuple[Any, torch.Tensor]) -> None:
    """The check can fail: the windowed stream agrees with the full-causal one while the stream fits the window
    and departs from it by far more than the tolerance once frames are evicted."""
    model, text = tiny
    windowed = CausalWan(model, family("longlive"), slots=1, max_frames=14, latent=LATENT)
    full = CausalWan(model, dataclasses.replace(family("longlive"), window=None), slots=1, max_frames=14, latent=LATENT)
    prompt = windowed.prompt(text[:1])
    a, b = cached(windowed, 0, 3, [prompt] * 7), reference(full, 3, [prompt] * 7)
    assert (a[:, :6] - b[:, :6]).abs().max() < TOLERANCE  # blocks 0–2 see everything either way
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-2  # measured 0.13


def test_sessions_batched_at_different_blocks_and_steps_equal_each_alone(tiny: tuple[Any, torch.Tensor]) -> None:
    """Three sessions start at different step boundaries and share every call; each equals itself alone. A slot
    reset for a new session serves it as a fresh one."""
    model, text = tiny
    runner = CausalWan(model, family("longlive"), slots=3, max_frames=14, latent=LATENT)
    prompts = [runner.prompt(text[i : i + 1]) for i in range(3)]
    sessions = {0: (11, 0), 1: (12, 3), 2: (13, 6)}  # slot: (seed, the step boundary it starts at)
    blocks = 5
    outs: dict[int, list[torch.Tensor]] = {slot: [] for slot in sessions}
    states = {}
    mixed = False
    for boundary in range(40):
        for slot, (seed, start) in sessions.items():
            if boundary >= start and slot not in states and len(outs[slot]) < blocks:
                states[slot] = runner.next_block(slot, seed, prompts[slot])
        if not states:
            break
        batch = list(states.values())
        mixed |= len({(s.start, s.step) for s in batch}) == len(batch) > 1
        for state, finished in zip(batch, runner.advance(batch), strict=True):
            if finished is not None:
                outs[state.slot].append(finished)
                del states[state.slot]
    assert mixed and all(len(o) == blocks for o in outs.values())
    for slot, (seed, _) in sessions.items():
        alone = CausalWan(model, family("longlive"), slots=1, max_frames=14, latent=LATENT)
        want = cached(alone, 0, seed, [prompts[slot]] * blocks)
        assert (torch.cat(outs[slot], dim=1) - want).abs().max() < 1e-5  # measured: at most 6e-7
    runner.reset(1)
    again = cached(runner, 1, 12, [prompts[1]] * 3)
    assert (again - torch.cat(outs[1][:3], dim=1)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["self-forcing", "longlive"])
@pytest.mark.parametrize("switch", [2, 5])
def test_a_prompt_switch_equals_the_reference_with_the_switch(
    tiny: tuple[Any, torch.Tensor], name: str, switch: int
) -> None:
    """`swap` (Self-Forcing) and `recache` (LongLive) at block 2 (the stream still fits the window: the recache
    takes every frame, sink too) and at block 5 (past it: the sink is kept)."""
    model, text = tiny
    runner = CausalWan(model, family(name), slots=1, max_frames=21, latent=LATENT)
    before, after = runner.prompt(text[:1]), runner.prompt(text[1:2])
    prompts = [before] * switch + [after] * (7 - switch)
    got, want = cached(runner, 0, 5, prompts), reference(runner, 5, prompts)
    assert (got - want).abs().max() < TOLERANCE
    if runner.family.prompt_switch == "recache":  # and the recache is not a swap
        swap = CausalWan(model, dataclasses.replace(runner.family, prompt_switch="swap"), 1, 21, LATENT)
        assert (got - reference(swap, 5, prompts)).abs().max() > 1e-3  # measured 0.026 at block 5


def test_the_runner_refuses_what_it_cannot_serve(tiny: tuple[Any, torch.Tensor]) -> None:
    model, text = tiny
    runner = CausalWan(model, CAUSAL_FAMILIES["causvid"], slots=2, max_frames=6, latent=LATENT)
    prompt = runner.prompt(text[:2])
    x = torch.zeros(2, *runner.block_shape)
    with pytest.raises(ValueError, match="slot 1's next block starts at frame 0"):
        runner.denoise([0, 1], x, [1000.0, 1000.0], prompt, [0, 3])
    with pytest.raises(ValueError, match="slots must be distinct"):
        runner.denoise([1, 1], x, [1000.0, 1000.0], prompt, [0, 0])
    with pytest.raises(ValueError, match="blocks of shape"):
        runner.denoise([0, 1], x[:, :, :2], [1000.0, 1000.0], prompt, [0, 0])
    runner.commit([0, 1], x, prompt, [0, 0])
    runner.commit([0, 1], x, prompt, [3, 3])
    with pytest.raises(ValueError, match="a stream ends by frame 6"):
        runner.denoise([0, 1], x, [1000.0, 1000.0], prompt, [6, 6])
    with pytest.raises(ValueError, match="'causvid' swaps prompts"):
        runner.recache(0, x[0], prompt.take([0]))
    with pytest.raises(ValueError, match="max_frames must be from 3 to 32"):
        CausalWan(model, CAUSAL_FAMILIES["causvid"], slots=1, max_frames=33, latent=LATENT)
    with pytest.raises(ValueError, match="multiples of the patch"):
        CausalWan(model, CAUSAL_FAMILIES["causvid"], slots=1, max_frames=6, latent=(5, 8))


def test_cache_memory_per_slot_at_wan_1_3b_sizes() -> None:
    """Wan2.1-T2V-1.3B (30 layers × 12 heads × 128) in bfloat16 at 480 × 832 (60 × 104 latents, 1560 tokens a
    frame), built on the meta device: a 21-frame Self-Forcing or CausVid slot holds 18 frames, a LongLive slot 9."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096
        ).to(torch.bfloat16)
    per_frame = 2 * 30 * 1560 * 1536 * 2  # keys and values, 30 layers, 1560 tokens, 1536 wide, 2 bytes
    for name, frames in (("self-forcing", 18), ("causvid", 18), ("longlive", 9)):
        runner = CausalWan(model, CAUSAL_FAMILIES[name], slots=1, max_frames=21, latent=(60, 104))
        assert (runner.tokens, runner.positions, runner.cache_bytes) == (1560, frames, frames * per_frame)
    assert per_frame == 287_539_200  # 274 MiB a latent frame: 4.8 GiB a Self-Forcing slot, 2.4 GiB a LongLive one


def test_runners_on_one_model_keep_its_own_processors(tiny: tuple[Any, torch.Tensor]) -> None:
    """A second runner on a model does not wrap the first's processors: anything not the runner's still reaches
    the model's own."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, _ = tiny
    for _ in range(2):
        CausalWan(model, CAUSAL_FAMILIES["causvid"], slots=1, max_frames=6, latent=LATENT)
    assert all(isinstance(b.attn1.processor.replaced, WanAttnProcessor) for b in model.blocks)
    assert all(isinstance(b.attn2.processor.replaced, WanAttnProcessor) for b in model.blocks)
