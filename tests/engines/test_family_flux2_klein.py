"""FLUX.2 [klein] distilled (`flux2-klein`) through the latent engine: told from its `model_index.json`, its
images are `Flux2KleinPipeline(is_distilled=True)`'s own at every step count and at sizes whose `mu` differ,
and each image in a mixed batch is the one it gets alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.models.families import mu_of, scheduler_class
from fewstep.models.importing import import_pipeline
from fewstep.models.latent_sampler import Draw
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from tests.pipelines import flux2_klein

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a white table"


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flux2_klein(tmp_path_factory.mktemp("klein") / "pipeline")


@pytest.fixture(scope="module")
def engine(klein: Path, tmp_path_factory: pytest.TempPathFactory) -> LatentEngine:
    """The tiny klein imported without `--family` (the pipeline says it is distilled), served at 16–256 pixels
    (its native size: 128 VAE cells of 2 pixels)."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    name, version = import_pipeline(klein, "klein", registry)
    loaded = LatentEngine(registry.version_dir(name, version), sides=(16, 256))
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def pipe(klein: Path) -> Any:
    import diffusers

    loaded = diffusers.Flux2KleinPipeline.from_pretrained(str(klein))
    loaded.set_progress_bar_config(disable=True)
    return loaded


@dataclass
class PipelineRun:
    """What Flux2KleinPipeline made for one item: its image, the sigmas it walked and its latents after each step
    (packed, (1, tokens, channels))."""

    pixels: np.ndarray
    sigmas: list[float]
    steps: list[torch.Tensor]


def diffusers_klein(pipe: Any, engine: LatentEngine, item: ImageItem) -> PipelineRun:
    """Flux2KleinPipeline's own run for `item`: the family's scheduler settings, the engine's initial noise (drawn
    from (seed, 0) in the patchified layout the pipeline draws its own in, which it packs into tokens), the model
    card's guidance 1 (no CFG either way: the pipeline is distilled)."""
    recipe = engine.sampler.recipe  # type: ignore[union-attr]
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    c, f = engine.sampler.channels, engine.sampler.factor  # type: ignore[union-attr]
    steps: list[torch.Tensor] = []

    def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        steps.append(tensors["latents"].clone())
        return {}

    out = pipe(
        prompt=item.prompt, num_inference_steps=item.steps, guidance_scale=1.0, height=h, width=w,
        latents=item_noise(item.seed, 0, (1, c, h // f, w // f)), max_sequence_length=recipe.max_sequence_length,
        output_type="np", callback_on_step_end=keep,
    )  # fmt: skip
    pixels = (out.images[0] * 255).round().astype(np.uint8)
    return PipelineRun(pixels, [float(s) for s in pipe.scheduler.sigmas], steps)


def our_steps(engine: LatentEngine, item: ImageItem) -> list[torch.Tensor]:
    """The engine's latents for `item` after each step, packed as the pipeline packs its own."""
    sampler = engine.sampler
    assert sampler is not None and item.width is not None and item.height is not None
    (walk,) = sampler.start([Draw(item.prompt, item.seed, item.steps, item.width, item.height)])
    steps = []
    while not walk.done:
        sampler.advance([walk])
        steps.append(walk.latents.flatten(2).permute(0, 2, 1).clone())
    return steps


def test_klein_is_told_from_its_model_index_and_its_recipe_is_the_pipelines(
    engine: LatentEngine, klein: Path, tmp_path: Path
) -> None:
    manifest = engine.manifest
    assert manifest["pipeline"]["arch"] == "flux2" and manifest["native_size"] == "256x256"
    assert manifest["latent"] == {"channels": 16, "vae_scale_factor": 4, "size_multiple": 4}  # 4 × 2×2 patches
    assert manifest["text"]["lengths"] == [512]
    recipe = manifest["recipe"]
    assert (recipe["family"], recipe["mu"], recipe["max_sequence_length"]) == (
        "flux2-klein",
        {"rule": "flux2-empirical"},
        512,
    )
    assert recipe["scheduler_config"]["use_dynamic_shifting"] and recipe["sigmas"]["4"] == [1.0, 0.75, 0.5, 0.25]
    assert (engine.spec.steps, engine.spec.default_steps, engine.spec.guidance.mode) == ([1, 2, 3, 4], 4, "none")
    assert not engine.spec.edits

    base = flux2_klein(tmp_path / "base", distilled=False)  # a base klein, as the pipeline saves one
    assert json.loads((base / "model_index.json").read_text())["is_distilled"] is False
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"pass `--family` with one of \['flux2-klein'\]"):
        import_pipeline(base, "base", registry)
    with pytest.raises(CheckpointError, match="family 'flux-schnell' does not sample flux2 pipelines"):
        import_pipeline(klein, "schnell", registry, family="flux-schnell")
    name, version = import_pipeline(base, "told", registry, family="flux2-klein", steps=[4])
    assert registry.manifest(name, version)["recipe"]["family"] == "flux2-klein"


def test_klein_makes_the_pipelines_image_at_every_step_count_and_at_sizes_of_their_own_mu(
    engine: LatentEngine, pipe: Any
) -> None:
    """Pixels within 2/255 at 1–4 steps and two sizes; the conditioning and every step's latents equal too (the
    tiny transformer barely reads its text: a wrong layer or template moves the pixels by 1/255 alone)."""
    assert pipe.config.is_distilled
    (ours_text,) = engine.sampler.text([(PROMPT, None)])  # type: ignore[union-attr]
    theirs_text, _ = pipe.encode_prompt(PROMPT, max_sequence_length=512)
    assert ours_text.mask is None and torch.equal(ours_text.states, theirs_text)  # all 512 tokens, padding too
    sizes = [(64, 64), (32, 48)]  # 256 and 96 tokens: each its own mu, so its own sigmas past the first
    assert mu_of({"rule": "flux2-empirical"}, 256, 4) != mu_of({"rule": "flux2-empirical"}, 96, 4)
    walked: dict[tuple[int, int, int], list[float]] = {}
    for height, width in sizes:
        for steps in (1, 2, 3, 4):
            item = ImageItem(PROMPT, 7, steps, width=width, height=height)
            (ours,) = engine.run([item])
            assert isinstance(ours, ImageResult) and ours.pixels.shape == (height, width, 3)
            theirs = diffusers_klein(pipe, engine, item)
            assert np.abs(ours.pixels.astype(int) - theirs.pixels.astype(int)).max() <= 2, (height, width, steps)
            walked[(height, width, steps)] = theirs.sigmas
            for k, (a, b) in enumerate(zip(our_steps(engine, item), theirs.steps, strict=True)):
                assert torch.allclose(a, b, atol=1e-5), (height, width, steps, k)
    for steps in (2, 3, 4):
        assert walked[(64, 64, steps)] != walked[(32, 48, steps)]  # the shift followed each size


def test_mixed_sizes_and_step_counts_share_a_batch_and_each_image_is_its_own(engine: LatentEngine) -> None:
    items = [
        ImageItem(PROMPT, 1, 1, width=64, height=64),
        ImageItem("a blue square", 2, 4, width=48, height=64),
        ImageItem(PROMPT, 3, 2, width=64, height=32),
        ImageItem("a green cross", 4, 3, width=32, height=32),
        ImageItem("a blue square", 5, 4, width=64, height=64),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert got.pixels.shape == (item.height, item.width, 3)
        assert np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1, item
    (other,) = engine.run([ImageItem(PROMPT, 9, 1, width=64, height=64)])
    assert isinstance(other, ImageResult) and isinstance(together[0], ImageResult)
    assert np.abs(other.pixels.astype(int) - together[0].pixels).mean() > 1  # seeds count
    (worded,) = engine.run([ImageItem("a blue square", 1, 1, width=64, height=64)])
    assert isinstance(worded, ImageResult) and not np.array_equal(worded.pixels, together[0].pixels)  # prompts do
    (bad,) = engine.run([ImageItem(PROMPT, 1, 1, width=30, height=32)])
    assert isinstance(bad, InvalidRequest) and "multiple of 4" in str(bad)
