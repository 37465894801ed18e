"""SANA-Sprint (`SanaSprintPipeline`, `SCMScheduler`) on a tiny random pipeline: the latent engine gives the
pipeline's own image at 1–4 steps and at sizes of its own, called with its defaults (the long instruction before
every prompt, 300 prompt tokens, guidance 4.5) and resolution binning off (fewstep serves the size asked for: the
pipeline's binning would sample a 1024-table size and resize); mixed in one batch, each image is its own; the
import tells the family from the scheduler and keeps its recipe."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.models.architectures import TextOut
from fewstep.models.families import Recipe, scheduler_class
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from tests.engines.test_latent import counter, drawing

pytestmark = pytest.mark.slow

PROMPT = "  A Red Circle on a white table "
"""Upper case and spaces around: the pipeline lower-cases and strips every prompt."""


@pytest.fixture(scope="module")
def sana_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.sana(tmp_path_factory.mktemp("sana") / "sana")


@pytest.fixture(scope="module")
def engine(sana_src: Path, tmp_path_factory: pytest.TempPathFactory) -> LatentEngine:
    registry = Registry(tmp_path_factory.mktemp("sana-registry"))
    name, version = import_pipeline(sana_src, "sprint", registry)  # no --family: told from the scheduler
    engine = LatentEngine(registry.version_dir(name, version), sides=(32, 128))
    engine.load()
    return engine


def diffusers_sana(src: Path, engine: LatentEngine, item: ImageItem, dtype: str = "float32") -> np.ndarray:
    """SanaSprintPipeline's own image for `item`, called with its defaults but for the step count, the size (binning
    off) and the engine's noise: the initial latents from (seed, 0), the noise the scheduler draws at its k-th
    step from (seed, k). Its 2-step list goes through `intermediate_timesteps` 1.3 (its default), the others are
    spaced evenly (the pipeline refuses the intermediate timestep for them). `dtype`: its networks' type."""
    import diffusers

    pipe = diffusers.SanaSprintPipeline.from_pretrained(str(src), torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    assert engine.sampler is not None
    recipe = engine.sampler.recipe
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    c, f = engine.sampler.channels, engine.sampler.factor
    module = importlib.import_module(type(pipe.scheduler).__module__)
    real = module.randn_tensor
    module.randn_tensor = drawing(item.seed, counter(0))
    guidance = {} if item.guidance is None else {"guidance_scale": item.guidance}
    try:
        out = pipe(
            item.prompt, num_inference_steps=item.steps, intermediate_timesteps=1.3 if item.steps == 2 else None,
            height=h, width=w, latents=item_noise(item.seed, 0, (1, c, h // f, w // f)), use_resolution_binning=False,
            output_type="np", **guidance,
        )  # fmt: skip
    finally:
        module.randn_tensor = real
    return (out.images[0].astype(np.float32) * 255).round().astype(np.uint8)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_sana_sprint_makes_the_pipelines_image_at_every_step_count_and_size(
    sana_src: Path, engine: LatentEngine
) -> None:
    items = [ImageItem(PROMPT, 7, steps) for steps in (1, 2, 3, 4)]
    items += [
        ImageItem("a blue square", 3, 2, width=64, height=32),
        ImageItem("a green cross", 5, 3, width=32, height=64),
    ]
    items += [ImageItem(PROMPT, 7, 2, guidance=2.0)]  # the embedded guidance, off its default
    for item in items:
        (ours,) = engine.run([item])
        assert isinstance(ours, ImageResult) and ours.pixels.shape == (item.height or 64, item.width or 64, 3)
        assert _diff(ours.pixels, diffusers_sana(sana_src, engine, item)) <= 2, item
    (default,) = engine.run([ImageItem(PROMPT, 7, 2)])
    (guided,) = engine.run([items[-1]])
    assert isinstance(default, ImageResult) and isinstance(guided, ImageResult)
    assert not np.array_equal(default.pixels, guided.pixels)  # the guidance embedding acts


def test_in_bfloat16_it_is_still_the_pipelines_image(sana_src: Path, engine: LatentEngine) -> None:
    """Networks in bfloat16, as served on CUDA: the TrigFlow rescaling runs in float32 before the cast, as in the
    pipeline (cast first, the 1-step image was 27/255 away)."""
    half = LatentEngine(engine.folder, sides=(32, 128), dtype="bfloat16")
    half.load()
    for item in (ImageItem(PROMPT, 7, 1), ImageItem("a blue square", 3, 2, width=64, height=32)):
        (ours,) = half.run([item])
        assert isinstance(ours, ImageResult)
        assert _diff(ours.pixels, diffusers_sana(sana_src, half, item, "bfloat16")) <= 2, item


def test_mixed_sizes_and_step_counts_share_a_batch_and_each_image_is_its_own(engine: LatentEngine) -> None:
    items = [
        ImageItem(PROMPT, 1, 1),
        ImageItem("a blue square", 2, 4, width=32, height=64),
        ImageItem(PROMPT, 3, 2, width=64, height=32),
        ImageItem("a green cross", 4, 3, width=32, height=32, guidance=6.0),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert got.pixels.shape == (item.height or 64, item.width or 64, 3) and _diff(got.pixels, alone.pixels) <= 1
    (other,) = engine.run([ImageItem(PROMPT, 9, 1)])
    assert isinstance(other, ImageResult) and isinstance(together[0], ImageResult)
    assert np.abs(other.pixels.astype(int) - together[0].pixels).mean() > 1  # seeds count
    refused = engine.run([ImageItem(PROMPT, 1, 1, width=48, height=64), ImageItem(PROMPT, 1, 2, guidance=31.0)])
    assert isinstance(refused[0], InvalidRequest) and "multiple of 32" in str(refused[0])
    assert isinstance(refused[1], InvalidRequest) and "between 1.0 and 30.0" in str(refused[1])


def test_every_prompt_keeps_the_pipelines_300_tokens_with_its_mask(engine: LatentEngine) -> None:
    """The transformer is given each prompt at 300 tokens (the first and the last 299 of the instruction and the
    prompt, padded on the right) with the attention mask: the cache keeps the padded row, not one cut to its own
    tokens (as it cuts the LLM encodings of prompts of their own lengths)."""
    assert engine.sampler is not None
    short, long = engine.sampler.text([(PROMPT, None), (" ".join(["red"] * 400), None)])
    assert short.states.shape == (1, 300, 8) and short.mask is not None and short.mask.shape == (1, 300)
    real = int(short.mask.sum())
    assert 1 < real < 300 and short.mask[0, :real].all() and not short.mask[0, real:].any()  # padded on the right
    assert long.mask is not None and bool(long.mask.all())  # cut at the pipeline's length, as it cuts
    assert engine.manifest["text"]["lengths"][0] > 300  # the instruction's tokens, and 298 more for the prompt
    cut = TextOut(short.states, mask=short.mask).take([0])  # prompts of their own lengths are kept cut
    kept = TextOut(short.states, mask=short.mask, padded=True).take([0])
    assert cut.states.shape[1] == real and kept.states.shape[1] == 300 and kept.padded


def test_import_tells_sana_sprint_from_its_scheduler_and_keeps_its_recipe(
    sana_src: Path, engine: LatentEngine, tmp_path: Path
) -> None:
    recipe = engine.manifest["recipe"]
    assert (recipe["family"], recipe["kind"], recipe["default_steps"], recipe["max_sequence_length"]) == (
        "sana-sprint", "trigflow", 2, 300,
    )  # fmt: skip
    assert recipe["guidance"] == {"mode": "embedded", "low": 1.0, "high": 30.0, "default": 4.5}
    assert recipe["scheduler_config"]["sigma_data"] == 0.5 and engine.spec.steps == [1, 2, 3, 4]
    angles = {int(n): [round(t, 4) for t in ts] for n, ts in recipe["timesteps"].items()}
    assert angles == {1: [1.5708], 2: [1.5708, 1.3], 3: [1.5708, 1.0472, 0.5236], 4: [1.5708, 1.1781, 0.7854, 0.3927]}
    assert Recipe.from_dict(json.loads(json.dumps(recipe))).to_dict() == recipe
    with pytest.raises(CheckpointError, match=r"timesteps in \(0, 1.5708\] radians, decreasing"):
        Recipe.from_dict({**recipe, "timesteps": {**recipe["timesteps"], "1": [3.0]}})

    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"family 'flux-schnell' does not sample sana pipelines; .*'sana-sprint'"):
        import_pipeline(sana_src, "schnell", registry, family="flux-schnell")
    folder = tmp_path / "flow"
    shutil.copytree(sana_src, folder)
    scheduler = folder / "scheduler/scheduler_config.json"  # a SANA base model's flow scheduler
    scheduler.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
    with pytest.raises(
        CheckpointError, match=r"cannot tell the family .*pass `--family` with one of \['sana-sprint'\]"
    ):
        import_pipeline(folder, "flow", registry)
