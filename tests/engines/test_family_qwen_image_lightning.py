"""The qwen-image-lightning family on a tiny QwenImagePipeline: a Lightning-style LoRA fused at import gives
QwenImagePipeline's own image with the LoRA loaded and fused by diffusers (the README's scheduler config, the
engine's initial latents) at 4 and 8 steps; prompts of their own lengths share a transformer call under the token
mask and each image is the one it gets alone; what import records and refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.models.checkpoint import sha256_file
from fewstep.models.families import QWEN_IMAGE_LIGHTNING
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise
from tests import pipelines
from tests.models.test_lora import make_lora

pytestmark = pytest.mark.slow  # a tiny Qwen-Image, a LoRA built with peft, diffusers' pipeline beside the engine
PROMPT = "a red circle on a white table"
LONG = "a tall blue lighthouse on a rocky island at dusk, waves breaking below and gulls overhead"
FAMILY = "qwen-image-lightning"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
"""The joint attention's projections, image and text streams: where the Lightning LoRAs put theirs."""
SCALE = 0.75


def lightning_lora(src: Path, out: Path) -> Path:
    """A random rank-4 LoRA on the transformer's attention projections (`make_lora`'s), rewritten in the layout of
    the non-diffusers Qwen-Image LoRAs: `lora_down` / `lora_up` weights and an `alpha` per layer (diffusers converts
    it on load, scaling by alpha / rank)."""
    from safetensors.torch import load_file, save_file

    made = load_file(str(make_lora(src, out / "diffusers", "QwenImagePipeline", "transformer", TARGETS)))
    state = {}
    for key, value in made.items():
        key = key.removeprefix("transformer.")
        state[key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")] = value
        state[key.rsplit(".lora_", 1)[0] + ".alpha"] = torch.tensor(8.0)
    save_file(state, str(out / "Qwen-Image-Lightning-tiny.safetensors"))
    return out / "Qwen-Image-Lightning-tiny.safetensors"


def diffusers_pipeline(src: Path, lora: Path | None) -> Any:
    """QwenImagePipeline from `src` with the README's Lightning scheduler, and `lora` loaded and fused by diffusers
    at `SCALE`."""
    import diffusers

    pipe = diffusers.QwenImagePipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_LIGHTNING)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(lora_scale=SCALE)
        pipe.unload_lora_weights()  # the fused weights stay
    return pipe


def diffusers_image(pipe: Any, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """The pipeline's own image for `item`: the engine's initial noise (drawn unpacked from (seed, 0)), packed as
    the pipeline packs its own; no CFG (`true_cfg_scale` 1); the family's prompt length."""
    c, f = engine.sampler.channels, engine.sampler.factor
    h, w = item.height or engine.spec.height, item.width or engine.spec.width
    latents = pipe._pack_latents(item_noise(item.seed, 0, (1, c, h // f, w // f)), 1, c, h // f, w // f)
    out = pipe(
        item.prompt, num_inference_steps=item.steps, true_cfg_scale=1.0, height=h, width=w, latents=latents,
        max_sequence_length=engine.sampler.recipe.max_sequence_length, output_type="np",
    )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny base pipeline, its LoRA, and the base + LoRA imported for 4 and 8 steps (an engine on it)."""
    root = tmp_path_factory.mktemp("qwen-image")
    src = pipelines.qwen_image(root / "base")
    lora = lightning_lora(src, root / "lora")
    registry = Registry(root / "registry")
    name, version = import_pipeline(
        src, "qwen-lightning", registry, family=FAMILY, steps=[4, 8], lora=lora, lora_scale=SCALE
    )
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 512))  # native: 128 cells of 4 pixels
    engine.load()
    return {"src": src, "lora": lora, "registry": registry, "engine": engine, "version": (name, version)}


def test_the_fused_lora_makes_the_pipelines_image_at_4_and_8_steps(qwen: dict[str, Any]) -> None:
    engine: LatentEngine = qwen["engine"]
    fused = diffusers_pipeline(qwen["src"], qwen["lora"])
    assert (engine.spec.family, engine.spec.steps, engine.spec.guidance.mode) == (FAMILY, [4, 8], "none")
    # The template's first 34 tokens dropped, each prompt at its own length; one past the 512 tokens cut where the
    # pipeline cuts it (the pipeline encodes up to 1024 + 34 tokens and keeps 512; the encoder is causal).
    for prompt in (PROMPT, LONG, " ".join(["red"] * 200)):
        ours = engine.sampler.text([(prompt, None)])[0]
        theirs, _ = fused.encode_prompt(prompt, max_sequence_length=512)
        assert ours.states.shape == theirs.shape and torch.allclose(ours.states, theirs, atol=1e-5)
    assert ours.states.shape[1] == 512
    items = [
        ImageItem(prompt, seed, steps, width=w, height=h)
        for seed, (prompt, steps, (w, h)) in enumerate([(PROMPT, 4, (64, 64)), (LONG, 4, (48, 32)),
                                                        (LONG, 8, (64, 64)), (PROMPT, 8, (48, 32))])
    ]  # fmt: skip
    for item in items:
        (ours,) = engine.run([item])
        assert isinstance(ours, ImageResult) and ours.pixels.shape == (item.height, item.width, 3)
        assert diff(ours.pixels, diffusers_image(fused, engine, item)) <= 2, item
    plain = diffusers_pipeline(qwen["src"], None)
    (ours,) = engine.run([items[0]])
    assert isinstance(ours, ImageResult) and diff(ours.pixels, diffusers_image(plain, engine, items[0])) > 2  # fused


def test_the_manifest_records_the_lightning_recipe_and_the_lora(qwen: dict[str, Any]) -> None:
    registry: Registry = qwen["registry"]
    manifest = registry.manifest(*qwen["version"])
    recipe = manifest["recipe"]
    config = recipe["scheduler_config"]
    assert config["base_shift"] == config["max_shift"] == pytest.approx(np.log(3))
    assert (config["use_dynamic_shifting"], config["time_shift_type"], config["shift"]) == (True, "exponential", 1.0)
    assert config["shift_terminal"] is None  # the base model's 0.02 is not kept
    assert recipe["mu"] == {
        "rule": "linear", "base_seq": 256, "max_seq": 8192, "base_shift": np.log(3), "max_shift": np.log(3),
    }  # fmt: skip
    assert recipe["sigmas"]["4"] == [1.0, 0.75, 0.5, 0.25]
    assert recipe["timesteps"]["4"] == pytest.approx([1000.0, 900.0, 750.0, 500.0])  # a static shift of 3
    assert (recipe["default_steps"], recipe["max_sequence_length"], recipe["guidance"]["mode"]) == (8, 512, "none")
    assert manifest["text"]["lengths"] == [512 + 34]  # the template's dropped tokens on top of the prompt's
    assert manifest["pipeline"]["arch"] == "qwenimage" and manifest["native_size"] == "512x512"
    assert manifest["latent"] == {"channels": 4, "vae_scale_factor": 4, "size_multiple": 8}
    lora = manifest["imported"]["lora"]
    assert lora == {
        "file": qwen["lora"].name, "sha256": sha256_file(qwen["lora"]), "scale": SCALE, "fused_into": ["transformer"],
    }  # fmt: skip


def test_prompts_of_their_own_lengths_sizes_and_steps_share_a_batch(qwen: dict[str, Any]) -> None:
    """Rows of one size share one transformer call, their prompts padded to the longest under the token mask: each
    row's prediction is the one it gets alone (and is not without the mask); every image is its own."""
    engine: LatentEngine = qwen["engine"]
    short, long = engine.sampler.text([(PROMPT, None), (LONG, None)])
    assert short.states.shape[1] < long.states.shape[1]
    nets = engine.sampler.nets
    x = item_noise(1, 0, (2, 4, 8, 8))
    t = torch.tensor([900.0, 500.0])
    length = long.states.shape[1]
    padded = torch.cat([torch.nn.functional.pad(short.states, (0, 0, 0, length - short.states.shape[1])), long.states])
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[0, short.states.shape[1] :] = 0
    together = nets.unet(x, t, padded, None, None, None, mask=mask)
    for row, text in enumerate((short, long)):
        alone = nets.unet(x[row : row + 1], t[row : row + 1], text.states, None, None, None, mask=text.mask)
        assert torch.allclose(together[row : row + 1], alone, atol=1e-5), row
    unmasked = nets.unet(x, t, padded, None, None, None, mask=None)
    assert not torch.allclose(unmasked[0:1], together[0:1], atol=1e-5)  # the padding would be attended to

    items = [
        ImageItem(PROMPT, 1, 4, width=64, height=64),
        ImageItem(LONG, 2, 8, width=64, height=64),
        ImageItem("a green cross", 3, 4, width=48, height=32),
        ImageItem(LONG, 4, 8, width=48, height=32),
    ]
    batch = engine.run(items)
    for item, got in zip(items, batch, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert got.pixels.shape == (item.height, item.width, 3) and diff(got.pixels, alone.pixels) <= 1, item
    (other,) = engine.run([ImageItem(PROMPT, 9, 4, width=64, height=64)])
    first = batch[0]
    assert isinstance(other, ImageResult) and isinstance(first, ImageResult)
    assert np.abs(other.pixels.astype(int) - first.pixels).mean() > 1  # seeds count
    (bad,) = engine.run([ImageItem(PROMPT, 1, 4, width=60, height=64)])
    assert isinstance(bad, InvalidRequest) and "multiple of 8" in str(bad)
    (unserved,) = engine.run([ImageItem(PROMPT, 1, 2, width=64, height=64)])
    assert isinstance(unserved, InvalidRequest)


def test_the_family_must_be_named_and_fit(qwen: dict[str, Any], tmp_path: Path) -> None:
    """The base model's files cannot tell a Lightning LoRA from none: `--family` is required; the default step count
    is the 8-step LoRA's; other families and step counts are refused."""
    registry = Registry(tmp_path / "registry")
    src = qwen["src"]
    with pytest.raises(CheckpointError, match=r"pass `--family` with one of \['qwen-image-lightning'\]"):
        import_pipeline(src, "q", registry)
    with pytest.raises(CheckpointError, match=r"does not sample qwenimage pipelines; choose from \['qwen-image-lig"):
        import_pipeline(src, "q", registry, family="flux-schnell")
    with pytest.raises(CheckpointError, match=r"serves \[4, 8\] steps, not \[2\]"):
        import_pipeline(src, "q", registry, family=FAMILY, steps=[2])
    name, version = import_pipeline(src, "q", registry, family=FAMILY)
    recipe = registry.manifest(name, version)["recipe"]
    assert (sorted(recipe["timesteps"]), recipe["default_steps"]) == (["8"], 8)
    assert "lora" not in registry.manifest(name, version)["imported"]


def test_a_diffusers_lora_is_scaled_by_its_own_adapter_metadata(qwen: dict[str, Any], tmp_path: Path) -> None:
    """A diffusers-format LoRA keeps its `lora_alpha` in the file's header: the fused transformer is the one
    `load_lora_weights` from the file makes (alpha / rank = 2 here, not 1)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen["src"]))
    torch.manual_seed(5)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    metadata = pipe.transformer.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    diffusers.QwenImagePipeline.save_lora_weights(
        str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=metadata, safe_serialization=True,
    )  # fmt: skip
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(qwen["src"], "meta", registry, family=FAMILY, lora=lora)
    ours = load_file(str(registry.version_dir(name, version) / "transformer/diffusion_pytorch_model.safetensors"))
    reference = diffusers.QwenImagePipeline.from_pretrained(str(qwen["src"]))
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name)
    reference.fuse_lora()
    reference.unload_lora_weights()
    theirs = reference.transformer.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    base = load_file(str(qwen["src"] / "transformer/diffusion_pytorch_model.safetensors"))
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.allclose(ours[key], base[key], atol=1e-3)


def test_the_vae_normalisation_is_the_pipelines(qwen: dict[str, Any]) -> None:
    """Decode and encode go through the frame axis and the VAE's latent mean and std as QwenImagePipeline's decode
    and QwenImageImg2ImgPipeline's `_encode_vae_image` do (the posterior sampled with the given noise)."""
    import diffusers

    from fewstep.models.architectures import ARCHITECTURES

    adapter = ARCHITECTURES["qwenimage"].adapter
    pipe = diffusers.QwenImageImg2ImgPipeline.from_pretrained(str(qwen["src"]))
    latents = item_noise(2, 0, (1, 4, 8, 12))
    with torch.no_grad():
        packed = pipe._pack_latents(latents, 1, 4, 8, 12)
        normalised = pipe._unpack_latents(packed, 32, 48, pipe.vae_scale_factor)
        std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1, 1)
        normalised = normalised / std + torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1, 1)
        theirs = pipe.vae.decode(normalised, return_dict=False)[0][:, :, 0]
        assert torch.allclose(adapter.decode(pipe.vae, latents), theirs, atol=1e-6)
        images = theirs.clamp(-1, 1)
        noise = item_noise(2, 1, (1, 4, 8, 12))
        module = __import__("diffusers.models.autoencoders.vae", fromlist=["randn_tensor"])
        real, module.randn_tensor = module.randn_tensor, lambda shape, **kw: noise.view(shape)
        try:
            expected = pipe._encode_vae_image(images.unsqueeze(2), generator=None)[:, :, 0]
        finally:
            module.randn_tensor = real
        assert torch.allclose(adapter.encode_image(pipe.vae, images, noise), expected, atol=1e-6)
