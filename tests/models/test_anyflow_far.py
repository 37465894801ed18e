"""AnyFlow FAR served as sessions (`models.anyflow_far`) against diffusers' own `AnyFlowFARPipeline`, on the tiny
pipeline of `tests/anyflow.py`: one session's clip is the pipeline's latents at 1, 2 and 4 steps, with and without
classifier-free guidance; sessions interleaved (different prompts, seeds and step counts, at different chunks,
sharing calls where they meet) are each their own pipeline run; the cache holds the tokens `ChunkPlan` says. The
partition has more chunks than `full_chunk_limit`, so the later chunks see compressed ones. Differences are printed
(run with -s)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from fewstep.models.anyflow_far import FARRunner, FARSession, clip_noise

pytestmark = pytest.mark.slow

PARTITION = (1, 1, 2, 1, 2)
"""Latent frames per chunk: 7 latent frames (25 pixel frames); from chunk 3 on, chunk 0 is compressed."""
LATENT = 8
"""Latent rows and columns (64 × 64 pixels): 16 full and 4 compressed tokens a frame."""
TOKENS = 16
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import diffusers

    from tests.anyflow import anyflow_far

    folder = anyflow_far(tmp_path_factory.mktemp("anyflow") / "far", chunk_partition=PARTITION)
    pipe = diffusers.AnyFlowFARPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runner(pipe: Any) -> FARRunner:
    return FARRunner(pipe.transformer, pipe.scheduler)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():  # flex attention without torch.compile says so on every call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def reference(pipe: Any, prompt: str, seed: int, steps: int, guidance: float = 1.0) -> torch.Tensor:
    """The pipeline's own latents (1, C, frames, h, w), every chunk started from the session's noise."""
    return pipe(
        prompt=prompt,
        negative_prompt="blurry" if guidance > 1.0 else None,
        height=8 * LATENT,
        width=8 * LATENT,
        num_frames=4 * (sum(PARTITION) - 1) + 1,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=clip_noise(seed, PARTITION, 16, LATENT, LATENT),
        max_sequence_length=TOKENS,
        output_type="latent",
    ).frames


def start(pipe: Any, runner: FARRunner, prompt: str, seed: int, steps: int, guidance: float = 1.0) -> FARSession:
    with torch.no_grad():  # as the pipeline encodes (with gradients on, UMT5 rounds differently: 5e-7)
        embeds, negative = pipe.encode_prompt(
            prompt, "blurry", do_classifier_free_guidance=guidance > 1.0, max_sequence_length=TOKENS
        )
    return runner.start(embeds, seed, steps, LATENT, LATENT, guidance_scale=guidance, negative_prompt_embeds=negative)


def run(runner: FARRunner, session: FARSession) -> list[torch.Tensor]:
    """The session run alone to its end → the chunks `step` handed back, in order."""
    chunks = []
    while not session.done:
        chunk = runner.step([session])[0]
        if chunk is not None:
            chunks.append(chunk)
            if not session.done:
                assert session.cache is not None
                view = session.cache.view()[0]
                got = (view["compressed_cache"].shape[3], view["full_cache"].shape[3])
                assert got == session.plan.cached_tokens(session.chunk)
    return chunks


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_one_session_is_the_pipeline(pipe: Any, runner: FARRunner, steps: int) -> None:
    session = start(pipe, runner, "a red circle", 3, steps)
    chunks = run(runner, session)
    expected = reference(pipe, "a red circle", 3, steps)
    diff = (session.video() - expected).abs().max().item()
    print(f"\n{steps} steps: |session − pipeline| = {diff:.2e}")
    assert session.video().shape == expected.shape == (1, 16, sum(PARTITION), LATENT, LATENT)
    assert [c.shape[2] for c in chunks] == list(PARTITION)
    assert torch.equal(torch.cat(chunks, dim=2), session.video())
    assert diff <= TOLERANCE


def test_guidance_is_the_pipelines(pipe: Any, runner: FARRunner) -> None:
    session = start(pipe, runner, "a blue square", 5, 2, guidance=4.0)
    run(runner, session)
    diff = (session.video() - reference(pipe, "a blue square", 5, 2, guidance=4.0)).abs().max().item()
    print(f"\nguidance 4: |session − pipeline| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_interleaved_sessions_are_each_their_own_run(pipe: Any, runner: FARRunner) -> None:
    calls: list[int] = []

    def rows(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        calls.append(kwargs["hidden_states"].shape[0])

    hook = pipe.transformer.register_forward_pre_hook(rows, with_kwargs=True)
    try:
        specs = [("a red circle", 7, 4, 1.0), ("a blue square", 9, 2, 1.0), ("a white table", 11, 1, 3.0)]
        sessions = [start(pipe, runner, *spec) for spec in specs]
        joins = [0, 3, 5]  # the step boundary each session joins at: chunks apart, meeting later
        boundary = 0
        while not all(s.done for s in sessions):
            live = [s for s, j in zip(sessions, joins, strict=True) if j <= boundary and not s.done]
            runner.step(live)
            boundary += 1
    finally:
        hook.remove()
    for (prompt, seed, steps, guidance), session in zip(specs, sessions, strict=True):
        diff = (session.video() - reference(pipe, prompt, seed, steps, guidance)).abs().max().item()
        print(f"\n{prompt!r} seed {seed}, {steps} steps: |session − pipeline| = {diff:.2e}")
        assert diff <= TOLERANCE
    assert max(calls) >= 3, "sessions at one chunk shared no call"


def test_compressed_chunks_keep_their_cache(pipe: Any, runner: FARRunner) -> None:
    """What an incremental cache step could rest on: a chunk's keys and values, once compressed, are the same in
    every later cache step (a compressed chunk attends only to earlier ones, all compressed), though the pipeline
    recomputes them after every chunk."""
    session = start(pipe, runner, "a red circle", 3, 1)
    before: list[torch.Tensor] = []
    while not session.done:
        runner.step([session])
        if session.cache is None or session.latents is not None:
            continue
        layers = session.cache.view()
        now = [layers[i]["compressed_cache"].clone() for i in sorted(layers)]
        for old, new in zip(before, now, strict=False):
            if old.shape[3]:
                assert (new[:, :, :, : old.shape[3]] - old).abs().max().item() <= 1e-5
        before = now
    assert before and before[0].shape[3] > 0, "no chunk was compressed"
