"""Z-Image-Turbo (`ZImagePipeline`) on the latent engine: told from the pipeline's files, its images are the
pipeline's own at every served step count (same initial latents; the flow scheduler draws no noise), and prompts
of different token lengths and images of different sizes and step counts share a batch without changing one
another."""

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
from fewstep.models.families import scheduler_class
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from tests import pipelines

pytestmark = pytest.mark.slow

SHORT = "a blue square"
LONG = "a red circle on a white table beside a small green cup"
"""In the chat template 32 and 73 tokens: captions of one and of three 32-token blocks (the transformer pads each
caption to a multiple of 32), so a batch of both is padded and masked inside the transformer."""
SIDES = (16, 1024)
"""The sizes served: the pipeline's native 1024 × 1024 included (requests here all give smaller sizes)."""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipelines.zimage(tmp_path_factory.mktemp("zimage") / "pipeline")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return Registry(tmp_path_factory.mktemp("zimage-registry"))


@pytest.fixture(scope="module")
def engine(source: Path, registry: Registry) -> LatentEngine:
    name, version = import_pipeline(source, "z-turbo", registry)  # no --family: told from the files
    engine = LatentEngine(registry.version_dir(name, version), sides=SIDES)
    engine.load()
    return engine


def diffusers_zimage(src: Path, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """ZImagePipeline's own image for `item`: the family's scheduler settings, the engine's initial noise (drawn
    from (seed, 0), (1, C, h, w): the pipeline's own latent layout), no guidance, the recipe's sequence length."""
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
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


def caption_lengths(engine: LatentEngine) -> tuple[list[list[int]], Any]:
    """The caption lengths of each transformer call from now on, and the hook recording them (to remove)."""
    calls: list[list[int]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append([len(c) for c in args[2]])

    nets: Any = engine.sampler.nets
    return calls, nets.unet_model.register_forward_pre_hook(record, with_kwargs=True)


def test_the_turbo_is_told_from_its_files_and_its_recipe_is_the_model_cards(engine: LatentEngine, source: Path) -> None:
    manifest = engine.manifest
    assert (
        manifest["pipeline"]["arch"] == "zimage" and manifest["pipeline"]["components"]["text_encoder"] == "Qwen3Model"
    )
    assert manifest["native_size"] == "1024x1024" and manifest["text"]["lengths"] == [512]
    assert manifest["latent"] == {"channels": 16, "vae_scale_factor": 2, "size_multiple": 4}  # 2×2 patches × factor
    recipe = engine.sampler.recipe
    assert (recipe.family, recipe.steps, recipe.default_steps) == ("z-image-turbo", [1, 2, 3, 4, 5, 6, 7, 8], 8)
    assert recipe.guidance.mode == "none" and recipe.max_sequence_length == 512 and recipe.mu is None
    assert recipe.scheduler_config["shift"] == 3.0 and recipe.scheduler_config["use_dynamic_shifting"] is False
    assert recipe.sigmas[8] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    # The card's "num_inference_steps=9 (8 DiT forwards)" is these 8 forwards: the old pipeline's 9th sigma was 0.
    shifted = [3 * s / (1 + 2 * s) for s in recipe.sigmas[8]]
    assert np.allclose(recipe.timesteps[8], [1000 * s for s in shifted], atol=1e-3)
    network = json.loads((source / "transformer/config.json").read_text())
    vae = json.loads((source / "vae/config.json").read_text())
    with pytest.raises(CheckpointError, match="no 2×2 patch embedder"):
        ARCHITECTURES["zimage"].adapter.geometry({**network, "all_patch_size": [1]}, vae)
    with pytest.raises(CheckpointError, match="`in_channels` must be the VAE's 16 latent channels"):
        ARCHITECTURES["zimage"].adapter.geometry({**network, "in_channels": 4}, vae)


def test_another_z_image_needs_the_family_named(source: Path, tmp_path: Path) -> None:
    """The undistilled Z-Image ships the same pipeline with shift 6 (sampled with CFG, 28–50 steps): not the turbo;
    a family of another architecture is refused for it."""
    base = tmp_path / "z-image"
    shutil.copytree(source, base)
    config = base / "scheduler/scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift": 6.0}))
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"pass `--family` with one of \['z-image-turbo'\]"):
        import_pipeline(base, "z", registry)
    with pytest.raises(CheckpointError, match=r"does not sample zimage pipelines; choose from \['z-image-turbo'\]"):
        import_pipeline(base, "z", registry, family="flux-schnell")
    name, version = import_pipeline(base, "z", registry, family="z-image-turbo", steps=[4])
    manifest = json.loads((registry.version_dir(name, version) / "manifest.json").read_text())
    assert manifest["recipe"]["scheduler_config"]["shift"] == 3.0 and list(manifest["recipe"]["sigmas"]) == ["4"]


def test_every_step_count_is_the_pipelines_image_and_a_mixed_batch_changes_none(
    engine: LatentEngine, source: Path
) -> None:
    """Steps 1–8 at four sizes in one batch, each size holding a short and a long prompt (one transformer call
    with captions of 32 and 96 tokens): each image is ZImagePipeline's and the one it gets alone."""
    sizes = [(64, 64), (32, 32), (48, 64), (64, 32)]
    items = [
        ImageItem(LONG if steps % 2 else SHORT, 10 + steps, steps, width=w, height=h)
        for steps, (w, h) in zip(range(1, 9), [s for s in sizes for _ in range(2)], strict=True)
    ]
    calls, hook = caption_lengths(engine)
    try:
        together = engine.run(items)
    finally:
        hook.remove()
    assert [32, 73] in calls or [73, 32] in calls  # the two lengths did share a transformer call
    for item, got in zip(items, together, strict=True):
        assert isinstance(got, ImageResult) and got.pixels.shape == (item.height, item.width, 3)
        theirs = diffusers_zimage(source, engine, item)
        assert np.abs(got.pixels.astype(int) - theirs.astype(int)).max() <= 2, item
        (alone,) = engine.run([item])
        assert isinstance(alone, ImageResult) and np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1
    (other,) = engine.run([ImageItem(SHORT, 99, 2, width=64, height=64)])
    assert isinstance(other, ImageResult) and np.abs(other.pixels.astype(int) - together[1].pixels).mean() > 1
    (bad,) = engine.run([ImageItem(SHORT, 1, 1, width=30, height=32)])
    assert isinstance(bad, InvalidRequest) and "multiple of 4" in str(bad)


def test_a_causal_lm_text_encoder_gives_the_same_images(
    engine: LatentEngine, source: Path, registry: Registry, tmp_path: Path
) -> None:
    """A pipeline saved with the Qwen3 checkpoint as `Qwen3ForCausalLM` (the pipeline reads only its hidden states):
    imported, it makes the Qwen3Model pipeline's images, and ZImagePipeline's own from the same folder."""
    import transformers

    causal = tmp_path / "causal"
    shutil.copytree(source, causal)
    inner = transformers.Qwen3Model.from_pretrained(str(source / "text_encoder"))
    lm = transformers.Qwen3ForCausalLM(inner.config)
    lm.model.load_state_dict(inner.state_dict())
    shutil.rmtree(causal / "text_encoder")
    lm.save_pretrained(str(causal / "text_encoder"), safe_serialization=True)
    index = json.loads((causal / "model_index.json").read_text())
    (causal / "model_index.json").write_text(
        json.dumps({**index, "text_encoder": ["transformers", "Qwen3ForCausalLM"]})
    )
    name, version = import_pipeline(causal, "z-causal", registry)
    theirs = LatentEngine(registry.version_dir(name, version), sides=SIDES)
    theirs.load()
    assert theirs.manifest["pipeline"]["components"]["text_encoder"] == "Qwen3ForCausalLM"
    item = ImageItem(LONG, 5, 2, width=32, height=32)
    (a,), (b,) = engine.run([item]), theirs.run([item])
    assert isinstance(a, ImageResult) and isinstance(b, ImageResult) and np.array_equal(a.pixels, b.pixels)
    assert np.abs(b.pixels.astype(int) - diffusers_zimage(causal, theirs, item).astype(int)).max() <= 2
    assert torch.equal(engine.sampler.text([(LONG, None)])[0].states, theirs.sampler.text([(LONG, None)])[0].states)
