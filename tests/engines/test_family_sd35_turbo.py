"""SD3.5 Large Turbo students (`sd35-turbo`) on a tiny StableDiffusion3Pipeline: the engine's images are the
pipeline's own (guidance 0, the engine's initial latents) at every step count and at sizes of their own, whatever
shares their batch; the recipe walks the scheduler's own timesteps (`set_timesteps(N)`, not FLUX's sigmas); the
family must be named at import, and a pipeline without its T5 encoder is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.models.architectures import ARCHITECTURES
from fewstep.models.families import Recipe, scheduler_class
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from tests import pipelines

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a white table"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipelines.sd3(tmp_path_factory.mktemp("pipelines") / "sd3")


@pytest.fixture(scope="module")
def engine(sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> LatentEngine:
    registry = Registry(tmp_path_factory.mktemp("sd3-registry") / "registry")
    name, version = import_pipeline(sd3, "sd35", registry, family="sd35-turbo")
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 128))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def pipe(sd3: Path) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sd3(pipe: Any, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """StableDiffusion3Pipeline's own image for `item`: the family's scheduler settings, no guidance, the engine's
    initial latents ((seed, 0), unpacked as the pipeline keeps them), its T5 length."""
    recipe = engine.sampler.recipe
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    c, f = engine.sampler.channels, engine.sampler.factor
    out = pipe(
        item.prompt, num_inference_steps=item.steps, guidance_scale=0.0, height=h, width=w,
        latents=item_noise(item.seed, 0, (1, c, h // f, w // f)), max_sequence_length=recipe.max_sequence_length,
        output_type="np",
    )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def test_sd35_turbo_makes_the_sd3_pipelines_image_at_every_step_count_and_size(engine: LatentEngine, pipe: Any) -> None:
    assert (engine.spec.family, engine.spec.steps, engine.spec.guidance.mode) == ("sd35-turbo", [1, 2, 3, 4], "none")
    assert engine.spec.size == "64x64"
    for steps in engine.spec.steps:
        # The pipeline's own spacing, to the bit: `set_timesteps(N)` on the shipped scheduler (shift 3).
        theirs = scheduler_class("FlowMatchEulerDiscreteScheduler").from_config(pipe.scheduler.config)
        theirs.set_timesteps(steps)
        ours = engine.sampler.templates[steps]
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas), steps
        for width, height in ((64, 64), (32, 48)):
            item = ImageItem(PROMPT, 7, steps, width=width, height=height)
            (got,) = engine.run([item])
            assert isinstance(got, ImageResult) and got.pixels.shape == (height, width, 3)
            want = diffusers_sd3(pipe, engine, item)
            assert np.abs(got.pixels.astype(int) - want.astype(int)).max() <= 2, (steps, width, height)


def test_mixed_sizes_and_step_counts_share_a_batch_and_each_image_is_its_own(engine: LatentEngine) -> None:
    items = [
        ImageItem(PROMPT, 1, 1, width=64, height=64),
        ImageItem("a blue square", 2, 4, width=48, height=64),
        ImageItem(PROMPT, 3, 2, width=64, height=32),
        ImageItem("a green cross", 4, 3, width=32, height=32),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert got.pixels.shape == (item.height, item.width, 3)
        assert np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1, item
    (other,) = engine.run([ImageItem(PROMPT, 9, 1, width=64, height=64)])
    assert isinstance(other, ImageResult) and np.abs(other.pixels.astype(int) - together[0].pixels).mean() > 1
    (bad,) = engine.run([ImageItem(PROMPT, 1, 1, width=30, height=32)])
    assert isinstance(bad, InvalidRequest) and "multiple of 4" in str(bad)  # VAE factor 2 × patch 2


def test_the_family_is_named_at_import_and_kept_in_the_manifest(
    sd3: Path, engine: LatentEngine, tmp_path: Path
) -> None:
    """The files cannot tell a turbo SD3.5 from a 28-step one: `--family` must say; the recipe keeps the shipped
    scheduler and its own spacing; a pipeline saved without T5 (which the pipeline would replace by zeros) is
    refused, and so is a dynamically shifting scheduler."""
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"pass `--family` with one of \['sd35-turbo'\]"):
        import_pipeline(sd3, "sd35", registry)
    with pytest.raises(CheckpointError, match=r"family 'flux-schnell' does not sample sd3 pipelines"):
        import_pipeline(sd3, "sd35", registry, family="flux-schnell")

    manifest = engine.manifest
    recipe = manifest["recipe"]
    assert (recipe["family"], recipe["sigma_rule"], recipe["max_sequence_length"]) == ("sd35-turbo", "scheduler", 256)
    assert recipe["scheduler_config"]["shift"] == 3.0 and not recipe["scheduler_config"]["use_dynamic_shifting"]
    assert (recipe["default_steps"], recipe["guidance"]["mode"], sorted(recipe["timesteps"])) == (
        4, "none", ["1", "2", "3", "4"],
    )  # fmt: skip
    assert recipe["timesteps"]["1"] == [1000.0] and recipe["timesteps"]["4"][0] == 1000.0
    assert recipe["sigmas"]["4"][0] == 1.0 and recipe["sigmas"]["4"] != [1.0, 0.75, 0.5, 0.25]  # not FLUX's
    assert manifest["pipeline"]["arch"] == "sd3" and manifest["text"]["lengths"] == [77, 77, 256]
    assert manifest["latent"] == {"channels": 4, "vae_scale_factor": 2, "size_multiple": 4}
    with pytest.raises(CheckpointError, match="`sigma_rule` must be one of"):
        Recipe.from_dict({**recipe, "sigma_rule": "cosine"})  # a manifest is untrusted
    network, vae = (json.loads((sd3 / part / "config.json").read_text()) for part in ("transformer", "vae"))
    with pytest.raises(CheckpointError, match=r"`in_channels` must be the VAE's 4 latent channels\. Given: 16"):
        ARCHITECTURES["sd3"].adapter.geometry({**network, "in_channels": 16}, vae)

    no_t5 = tmp_path / "no-t5"
    shutil.copytree(sd3, no_t5)
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    )
    for folder in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(no_t5 / folder)
    with pytest.raises(CheckpointError, match="the pipeline lacks text_encoder_3, tokenizer_3"):
        import_pipeline(no_t5, "no-t5", registry, family="sd35-turbo")

    dynamic = tmp_path / "dynamic"
    shutil.copytree(sd3, dynamic)
    config = dynamic / "scheduler/scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(CheckpointError, match="shifts dynamically"):
        import_pipeline(dynamic, "dynamic", registry, family="sd35-turbo")
    assert registry.promoted("sd35") is None  # refusals leave the registry as it was
