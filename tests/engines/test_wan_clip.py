"""The clip engine serves each few-step bidirectional Wan family as the family's own sampler makes it: a clip equals
diffusers' `WanPipeline` driven by that family's schedule (the same starting and fresh noise given to both), alone
or batched with clips at other steps, step counts and lengths; a clip that goes non-finite fails alone; requests the
model cannot make are refused.

How the reference is driven: `WanPipeline.__call__` only calls `scheduler.set_timesteps(num_inference_steps)` (no
`sigmas` or `timesteps` argument), so its scheduler is replaced by one written here from the sources, independently
of `models.wan_clip`:

* wan-lightning: diffusers' own `FlowMatchEulerDiscreteScheduler` (shift 1) whose `set_timesteps` is given LightX2V's
  σ (`linspace(1, 0, 1001)[:-1]` shifted by 5, read at 1000 − [1000, 750, 500, 250]): its Euler step is LightX2V's;
* fastwan: a DMD scheduler (x0 = x − σ·v, then (1 − σ')·x0 + σ'·ε) whose σ is looked up, as FastVideo does, in the
  table of diffusers' `FlowMatchEulerDiscreteScheduler(shift=8.0)` at the raw timesteps [1000, 757, 522];
* turbowan: TurboDiffusion's loop (TrigFlow times [atan 80, 1.5, 1.4, 1.0][:n] + [0], t = sin/(cos + sin), x₀ = ε·t₀,
  the network at 1000·t, x = (1 − t')(x − t·v) + t'·ε).

The fresh noise ε of step k is `item_noise(seed, k)` in both (the engine's contract: noise is a function of (seed,
step)). Latents are compared in float32 to 1e-4, pixels as served to 2/255.

On the tiny WanPipeline (`tests.pipelines.wan`), imported by `fewstep import`'s function at 32 × 32 with clips of at
most 9 pixel frames (3 latent frames) and prompts of 16 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import Frame, Session, StreamEngine, StreamRequest
from fewstep.engines.wan_clip import WanClipEngine, clip_video_spec
from fewstep.errors import InvalidRequest, Overloaded
from fewstep.models.importing import import_clip_video
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from fewstep.service.kinds import KINDS
from fewstep.service.settings import Settings

pytestmark = pytest.mark.slow  # builds the tiny WanPipeline (UMT5, the Wan VAE) and runs it

FAMILIES = ("wan-lightning", "fastwan", "turbowan")
PROMPT = "a red fox in the snow"
SHAPE = (16, 3, 4, 4)
"""A 9-frame clip's latents at 32 × 32."""


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def engines(wan_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WanClipEngine]]:
    """A loaded engine of 3 sessions per family, each version imported as `fewstep import` imports it."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    out = {}
    for family in FAMILIES:
        name, version = import_clip_video(wan_src, family, registry, family, size=(32, 32), frames=9, max_tokens=16)
        engine = WanClipEngine(registry.version_dir(name, version), capacity=3)
        engine.load()
        out[family] = engine
    yield out
    for engine in out.values():
        engine.close()


# -- the reference: WanPipeline with the family's schedule ---------------------------------------------------------
class _Stepper:
    """What `WanPipeline.__call__` asks of its scheduler, over given timesteps and σ, stepping through x0 with the
    fresh noise `item_noise(seed, k)` (DMD, rCM)."""

    order = 1

    def __init__(self, timesteps: list[float], sigmas: list[float], seed: int) -> None:
        self._timesteps, self._sigmas, self.seed = timesteps, [*sigmas, 0.0], seed
        self.config = type("Config", (), {"num_train_timesteps": 1000})()

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        self.timesteps = torch.tensor(self._timesteps, dtype=torch.float32)
        self.sigmas = torch.tensor(self._sigmas, dtype=torch.float64)
        self.index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.index = begin_index

    def step(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor, return_dict: bool = False) -> tuple[Any]:
        sigma, after = self._sigmas[self.index], self._sigmas[self.index + 1]
        x0 = x.double() - sigma * v.double()
        self.index += 1
        if after == 0.0:
            return (x0.float(),)
        fresh = item_noise(self.seed, self.index, tuple(x.shape[1:]))[None].double()
        return (((1 - after) * x0 + after * fresh).float(),)


def lightning_scheduler(steps: int, seed: int) -> tuple[Any, float]:
    import diffusers

    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = 5.0 * s / (1 + 4.0 * s)
    sigmas = [float(table[1000 - d]) for d in (1000, 750, 500, 250)]

    class Exact(diffusers.FlowMatchEulerDiscreteScheduler):  # type: ignore[misc]
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> None:
            super().set_timesteps(sigmas=sigmas, device=device)

    return Exact(shift=1.0), 1.0


def fastwan_scheduler(steps: int, seed: int) -> tuple[Any, float]:
    import diffusers

    table = diffusers.FlowMatchEulerDiscreteScheduler(shift=8.0)
    timesteps = [1000.0, 757.0, 522.0]
    sigmas = [float(table.sigmas[int(torch.argmin((table.timesteps - t).abs()))]) for t in timesteps]
    return _Stepper(timesteps, sigmas, seed), 1.0


def turbowan_scheduler(steps: int, seed: int) -> tuple[Any, float]:
    angles = [math.atan(80.0), 1.5, 1.4, 1.0][:steps]
    sigmas = [math.sin(a) / (math.cos(a) + math.sin(a)) for a in angles]
    return _Stepper([1000.0 * t for t in sigmas], sigmas, seed), sigmas[0]


SCHEDULERS = {"wan-lightning": lightning_scheduler, "fastwan": fastwan_scheduler, "turbowan": turbowan_scheduler}


def reference(wan_src: Path, family: str, steps: int, seed: int, output: str) -> np.ndarray | torch.Tensor:
    """The tiny WanPipeline's clip of `PROMPT` (9 frames, 32 × 32, no guidance) under the family's schedule."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan_src), torch_dtype=torch.float32)
    scheduler, start = SCHEDULERS[family](steps, seed)
    pipe.scheduler = scheduler
    latents = item_noise(seed, 0, SHAPE)[None] * start
    out = pipe(
        PROMPT, height=32, width=32, num_frames=9, num_inference_steps=steps, guidance_scale=1.0,
        latents=latents, output_type=output, max_sequence_length=16,
    ).frames  # fmt: skip
    return out[0]


def run(engine: WanClipEngine, requests: list[StreamRequest], starts: list[int] | None = None) -> list[list[Frame]]:
    """Each request's frames, the sessions opened at the given `advance` calls (default: all at once) and advanced
    together from then on."""
    starts = starts or [0] * len(requests)
    sessions: list[Session | None] = [None] * len(requests)
    got: dict[int, list[Frame]] = {}
    call = 0
    while call == 0 or any(s is None or not s.finished for s in sessions):
        for i, request in enumerate(requests):
            if starts[i] == call:
                sessions[i] = engine.open(request)
                got[i] = []
        live = [s for s in sessions if s is not None and not s.finished]
        for frame in engine.advance(live):
            got[next(i for i, s in enumerate(sessions) if s is frame.session)].append(frame)
        call += 1
    for s in sessions:
        assert s is not None
        engine.end(s)
    return [got[i] for i in range(len(requests))]


def pixels(frames: list[Frame]) -> np.ndarray:
    assert [f.index for f in frames] == list(range(len(frames)))
    return np.stack([f.pixels for f in frames])


# -- tests ----------------------------------------------------------------------------------------------------------
def test_it_is_a_stream_engine_with_the_familys_spec(engines: dict[str, WanClipEngine]) -> None:
    for family, engine in engines.items():
        assert isinstance(engine, StreamEngine)
        spec = engine.spec
        assert spec == clip_video_spec(engine.manifest, "1", 3)
        assert (spec.size, spec.max_frames, spec.sink, spec.window, spec.capacity) == ("32x32", 9, 0, 3, 3)
        assert spec.step_counts == {"wan-lightning": (4,), "fastwan": (3,), "turbowan": (1, 2, 3, 4)}[family]
        assert spec.default_steps == max(spec.step_counts)
        # A gateway refuses a count the VAE cannot make, and a clip asked in seconds gets the nearest it can.
        assert spec.frame_step == 4
        with pytest.raises(InvalidRequest, match=r"1 \+ 4·k frames"):
            spec.validate(StreamRequest(PROMPT, 6, spec.default_steps, 0), 9)
        spec.validate(StreamRequest(PROMPT, 5, spec.default_steps, 0), 9)
        assert [spec.frames_near(n, 9) for n in (1, 2, 3, 4, 7, 8, 20)] == [1, 1, 5, 5, 9, 9, 9]


@pytest.mark.parametrize(("family", "steps"), [("wan-lightning", 4), ("fastwan", 3), ("turbowan", 4), ("turbowan", 2)])
def test_a_clip_is_wan_pipelines_under_the_familys_schedule(
    wan_src: Path, engines: dict[str, WanClipEngine], family: str, steps: int
) -> None:
    engine, seed = engines[family], 7
    theirs = reference(wan_src, family, steps, seed, "latent")
    assert engine.prompts is not None and engine.sampler is not None
    clip = engine.sampler.begin(engine.prompts(PROMPT)[0], seed, steps, SHAPE)
    while not clip.finished:
        engine.sampler.advance([clip])
    torch.testing.assert_close(clip.latents, theirs, rtol=1e-4, atol=1e-4)

    ours = pixels(run(engine, [StreamRequest(PROMPT, 9, steps, seed)])[0])
    video = np.asarray(reference(wan_src, family, steps, seed, "np"))
    assert ours.shape == video.shape == (9, 32, 32, 3)
    assert np.abs(ours / 255.0 - video).max() <= 2 / 255


def test_clips_at_different_steps_counts_and_lengths_batched_equal_each_alone(
    engines: dict[str, WanClipEngine],
) -> None:
    engine = engines["turbowan"]
    requests = [StreamRequest(PROMPT, 9, 4, 1), StreamRequest("a boat", 5, 2, 2), StreamRequest(PROMPT, 9, 3, 3)]
    alone = [pixels(run(engine, [r])[0]) for r in requests]
    together = run(engine, requests, starts=[0, 1, 1])
    for want, got in zip(alone, together, strict=True):
        assert np.array_equal(pixels(got), want)
    engine = engines["fastwan"]
    requests = [StreamRequest(PROMPT, 9, 3, 4), StreamRequest(PROMPT, 9, 3, 5)]
    alone = [pixels(run(engine, [r])[0]) for r in requests]
    together = run(engine, requests, starts=[0, 2])
    for want, got in zip(alone, together, strict=True):
        assert np.array_equal(pixels(got), want)


def test_a_clip_arrives_in_one_burst_at_its_last_step(engines: dict[str, WanClipEngine]) -> None:
    engine = engines["wan-lightning"]
    session = engine.open(StreamRequest(PROMPT, 5, 4, 0))
    bursts = [len(engine.advance([session])) for _ in range(4)]
    assert bursts == [0, 0, 0, 5] and session.finished and engine.advance([session]) == []
    engine.end(session)


def test_a_clip_that_goes_non_finite_fails_alone(engines: dict[str, WanClipEngine]) -> None:
    engine = engines["fastwan"]
    bad, good = engine.open(StreamRequest(PROMPT, 9, 3, 1)), engine.open(StreamRequest(PROMPT, 9, 3, 2))
    bad.state.latents[0, 0, 0, 0] = float("nan")
    frames: list[Frame] = []
    while not good.finished:
        frames += engine.advance([bad, good])
    assert {id(f.session) for f in frames} == {id(good)} and len(frames) == 9
    assert bad.error is not None and "not finite" in str(bad.error) and bad.closed and engine.active == 1
    engine.end(good)
    assert engine.active == 0


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"frames": 10}, "`frames` must be 1 + 4·k pixel frames (1, 5, 9) up to 9. Given: 10"),
        ({"frames": 13}, "up to 9. Given: 13"),
        ({"frames": 0}, "Given: 0"),
        ({"steps": 3}, "steps"),
    ],
)
def test_requests_the_model_cannot_make_are_refused(
    engines: dict[str, WanClipEngine], change: dict[str, int], needle: str
) -> None:
    engine = engines["wan-lightning"]
    request = {"prompt": PROMPT, "frames": 9, "steps": 4, "seed": 0} | change
    with pytest.raises(InvalidRequest) as refused:
        engine.open(StreamRequest(**request))
    assert needle in str(refused.value), refused.value
    assert engine.active == 0


def test_a_clip_cannot_be_steered_and_capacity_is_kept(engines: dict[str, WanClipEngine]) -> None:
    engine = engines["fastwan"]
    sessions = [engine.open(StreamRequest(PROMPT, 1, 3, seed)) for seed in range(3)]
    with pytest.raises(InvalidRequest, match="a clip has one prompt"):
        engine.steer(sessions[0], "a boat")
    with pytest.raises(Overloaded):
        engine.open(StreamRequest(PROMPT, 1, 3, 9))
    engine.end(sessions[0])
    sessions[0] = engine.open(StreamRequest(PROMPT, 1, 3, 9))
    for s in sessions:
        engine.end(s)
    assert engine.active == 0


def test_the_kind_serves_streams_and_gates_on_clips_the_vae_makes(engines: dict[str, WanClipEngine]) -> None:
    kind = KINDS["diffusers-video"]
    manifest = engines["turbowan"].manifest
    assert kind.serves == "streams"
    probes = kind.probes(Settings(video_gate_streams=2, video_gate_frames=16), manifest)
    assert probes is not None and probes.frames == 9  # the longest 1 + 4k within both 16 and the model's 9
    probes = kind.probes(Settings(video_gate_streams=2, video_gate_frames=8), manifest)
    assert probes is not None and probes.frames == 5
    assert kind.probes(Settings(video_gate_streams=0), manifest) is None
    video = kind.render(engines["turbowan"], probes)
    assert video.shape == (2, 5, 3, 32, 32) and np.isfinite(video).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_a_clip_is_the_cpu_clip(engines: dict[str, WanClipEngine], dtype: str) -> None:
    """The served configuration (CUDA, bfloat16 networks, float32 latents) makes the float32 CPU clip to within its
    precision, batched with another clip at another step. Not yet run: no GPU was lent to the task that wrote it."""
    cpu = engines["turbowan"]
    cuda = WanClipEngine(cpu.folder, capacity=2, device="cuda", dtype=dtype)
    cuda.load()
    cuda.warmup()
    try:
        clips = {}
        for label, engine in (("cpu", cpu), ("cuda", cuda)):
            requests = [StreamRequest(PROMPT, 9, 4, 1), StreamRequest("a boat", 5, 2, 2)]
            clips[label] = pixels(run(engine, requests, starts=[0, 1])[0]).astype(int)
        gap = np.abs(clips["cpu"] - clips["cuda"])
        print(f"cuda {dtype} vs cpu float32: mean {gap.mean():.3f}, max {gap.max()} levels")
        assert gap.mean() < (0.1 if dtype == "float32" else 3.0)
    finally:
        cuda.close()
