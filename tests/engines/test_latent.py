"""The latent engine on tiny random diffusers pipelines: every family gives the diffusers pipeline's own image
(same initial latents, same per-step noise), whatever shares its batch, at every size and step count."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult, StepEngine
from fewstep.engines.latent import LatentEngine, latent_spec
from fewstep.errors import CheckpointError, InvalidRequest
from fewstep.models.families import FAMILIES, scheduler_class
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise

PROMPT = "a red circle on a white table"
CASES = [(arch, family) for arch in ("sd", "sdxl") for family, f in FAMILIES.items() if f.kind == "unet"]
FAST_SDXL = "lightning"
"""Every family's sampling on SD in the fast layer, and on SDXL (the same schedulers, SDXL's conditioning)
once there; SDXL's other families in the slow layer (~11 s)."""


def _case(arch: str, family: str) -> Any:
    slow = arch == "sdxl" and family != FAST_SDXL
    return pytest.param(arch, family, id=f"{arch}-{family}", marks=[pytest.mark.slow] if slow else [])


def _engine(tiny_pipelines: dict[str, Path], tmp: Path, arch: str, family: str, **kw: Any) -> LatentEngine:
    registry = Registry(tmp / "registry")
    src = tiny_pipelines[f"{arch}-lcm" if family == "lcm" else arch]
    name, version = import_pipeline(src, f"{arch}-{family}", registry, family=family, **kw)
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 128))
    engine.load()
    return engine


def run_diffusers(
    cls: Any, src: Path, engine: LatentEngine, item: ImageItem, noise: dict[str, Any], **kwargs: Any
) -> np.ndarray:
    """`cls` (a diffusers pipeline) loaded from `src` with the engine's family scheduler, called for `item` with
    `randn_tensor` replaced in the modules `noise` names (`"scheduler"` for the scheduler's own module)."""
    pipe = cls.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    recipe = engine.sampler.recipe
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    names = {"scheduler": type(pipe.scheduler).__module__}
    patched = {importlib.import_module(names.get(m, m)): f for m, f in noise.items()}
    real = {m: m.randn_tensor for m in patched}
    when = (
        {"timesteps": recipe.timesteps[item.steps]} if recipe.custom_timesteps else {"num_inference_steps": item.steps}
    )
    guidance = recipe.guidance.default if item.guidance is None else item.guidance
    for m, f in patched.items():
        m.randn_tensor = f
    try:
        out = pipe(item.prompt, guidance_scale=guidance, output_type="np", **when, **recipe.step_kwargs, **kwargs)
    finally:
        for m, f in real.items():
            m.randn_tensor = f
    return (out.images[0] * 255).round().astype(np.uint8)


def drawing(seed: int, step: Any) -> Any:
    """A `randn_tensor` stand-in drawing the engine's (seed, step) noise; `step` a number or a counter to call."""

    def draw(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None) -> Any:
        return item_noise(seed, step() if callable(step) else step, tuple(shape)).to(dtype or torch.float32)

    return draw


def counter(start: int) -> Any:
    """start + 1, start + 2, … on each call."""
    at = [start]

    def next_step() -> int:
        at[0] += 1
        return at[0]

    return next_step


def diffusers_image(src: Path, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """The diffusers pipeline's own image for `item`, with the family's scheduler and the engine's noise: the
    initial latents from (seed, 0), and the k-th noise the scheduler draws from (seed, k)."""
    import diffusers

    arch = engine.manifest["pipeline"]["arch"]
    cls = diffusers.StableDiffusionPipeline if arch == "sd" else diffusers.StableDiffusionXLPipeline
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    latents = item_noise(item.seed, 0, (1, 4, h // engine.sampler.factor, w // engine.sampler.factor))
    noise = {"scheduler": drawing(item.seed, counter(0))}
    return run_diffusers(
        cls, src, engine, item, noise, negative_prompt=item.negative_prompt, latents=latents, height=h, width=w
    )


@pytest.mark.slow  # every UNet family against its pipeline: 18 s of the fast layer, which is at its budget
@pytest.mark.parametrize(("arch", "family"), [_case(a, f) for a, f in CASES])
def test_every_family_makes_the_diffusers_pipelines_image(
    tiny_pipelines: dict[str, Path], tmp_path: Path, arch: str, family: str
) -> None:
    engine = _engine(tiny_pipelines, tmp_path, arch, family)
    assert isinstance(engine, StepEngine)
    assert engine.spec.cost(ImageItem(PROMPT, 1, 1)) == engine.spec.nfe(ImageItem(PROMPT, 1, 1))  # CLIP: not charged
    src = tiny_pipelines[f"{arch}-lcm" if family == "lcm" else arch]
    images = []
    for steps in engine.spec.steps[:4]:
        item = ImageItem(PROMPT, seed=7, steps=steps)
        (ours,) = engine.run([item])
        assert isinstance(ours, ImageResult) and ours.pixels.shape == (64, 64, 3)
        theirs = diffusers_image(src, engine, item)
        assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2, (family, steps)
        images.append(ours.pixels)
    (other,) = engine.run([ImageItem(PROMPT, seed=8, steps=engine.spec.default_steps)])
    assert isinstance(other, ImageResult) and np.abs(other.pixels.astype(int) - images[-1]).mean() > 1  # seeds count


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_mixed_steps_and_sizes_share_a_batch_and_each_image_is_its_own(
    tiny_pipelines: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    engine = _engine(tiny_pipelines, tmp_path, arch, "turbo")
    items = [
        ImageItem(PROMPT, 1, 1),
        ImageItem("a blue square", 2, 4, width=48, height=64),
        ImageItem(PROMPT, 3, 2, width=64, height=32),
        ImageItem("a green cross", 4, 3),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert got.pixels.shape == ((item.height or 64), (item.width or 64), 3)
        assert np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1
    sized = items[1]
    theirs = diffusers_image(tiny_pipelines[arch], engine, sized)
    assert np.abs(together[1].pixels.astype(int) - theirs.astype(int)).max() <= 2  # a size of its own, as diffusers


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_classic_cfg_with_a_negative_prompt_is_the_pipelines(
    tiny_pipelines: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    """A UNet without the guidance embedding in the lcm family (an LCM-LoRA merged into a base) runs classic CFG."""
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines[arch], "lora", registry, family="lcm")
    engine = LatentEngine(registry.version_dir(name, version))
    engine.load()
    assert engine.spec.guidance.mode == "cfg"
    item = ImageItem(PROMPT, 5, 4, guidance=1.8, negative_prompt="a blurry picture")
    (ours,) = engine.run([item])
    assert isinstance(ours, ImageResult) and ours.nfe == 8  # two evaluations a step
    theirs = diffusers_image(tiny_pipelines[arch], engine, item)
    assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2
    (plain,) = engine.run([ImageItem(PROMPT, 5, 4)])
    assert isinstance(plain, ImageResult) and not np.array_equal(plain.pixels, ours.pixels)  # guidance acts


def test_guidance_and_sizes_outside_the_familys_rules_are_refused(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    turbo = _engine(tiny_pipelines, tmp_path / "t", "sd", "turbo")
    lcm = _engine(tiny_pipelines, tmp_path / "l", "sd", "lcm")
    cases = [
        (turbo, ImageItem(PROMPT, 1, 1, guidance=5.0), "`guidance_scale` is not taken by this model (turbo students"),
        (turbo, ImageItem(PROMPT, 1, 1, negative_prompt="x"), "`negative_prompt` needs classifier-free guidance"),
        (lcm, ImageItem(PROMPT, 1, 4, guidance=30.0), "`guidance_scale` must be between 1.0 and 15.0. Given: 30.0"),
        (lcm, ImageItem(PROMPT, 1, 4, negative_prompt="x"), "`negative_prompt` needs classifier-free guidance"),
        (turbo, ImageItem(PROMPT, 1, 1, width=63, height=64), "`size` must be WxH with each side a multiple of 4"),
        (turbo, ImageItem(PROMPT, 1, 1, width=256, height=64), "in [16, 128]. Given: '256x64'"),
        (turbo, ImageItem(PROMPT, 1, 5), "`steps` must be between 1 and 4. Given: 5"),
    ]
    for engine, item, needle in cases:
        (out,) = engine.run([item])
        assert isinstance(out, InvalidRequest) and needle in str(out), (needle, out)
    (embedded,) = lcm.run([ImageItem(PROMPT, 1, 4, guidance=3.0)])
    (default,) = lcm.run([ImageItem(PROMPT, 1, 4)])
    assert isinstance(embedded, ImageResult) and isinstance(default, ImageResult) and embedded.nfe == 4
    assert not np.array_equal(embedded.pixels, default.pixels)  # the embedding changes the image


def test_prompts_past_the_tokenizers_limit_are_cut_as_diffusers_cuts_them(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    engine = _engine(tiny_pipelines, tmp_path, "sd", "turbo")
    long = " ".join(["red"] * 60)  # 4 tokens a word: far past 77
    assert engine.sampler.tokenizers.count(long) > engine.sampler.tokenizers.max_tokens
    ids = engine.sampler.tokenizers.items[0](long).input_ids
    cut = engine.sampler.tokenizers.items[0].decode(ids[1 : engine.sampler.tokenizers.max_tokens - 1])
    (a,) = engine.run([ImageItem(long, 3, 1)])
    (b,) = engine.run([ImageItem(cut, 3, 1)])
    assert isinstance(a, ImageResult) and isinstance(b, ImageResult) and np.array_equal(a.pixels, b.pixels)
    theirs = diffusers_image(tiny_pipelines["sd"], engine, ImageItem(long, 3, 1))
    assert np.abs(a.pixels.astype(int) - theirs.astype(int)).max() <= 2


def diffusers_flux(src: Path, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """FluxPipeline's own image for `item`: the family's scheduler settings, the engine's initial noise (drawn
    unpacked from (seed, 0), packed as the pipeline packs its own), its T5 length."""
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    recipe = engine.sampler.recipe
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    c, f = engine.sampler.channels, engine.sampler.factor
    latents = pipe._pack_latents(item_noise(item.seed, 0, (1, c, h // f, w // f)), 1, c, h // f, w // f)
    out = pipe(
        item.prompt, num_inference_steps=item.steps, guidance_scale=0.0, height=h, width=w, latents=latents,
        max_sequence_length=recipe.max_sequence_length, output_type="np",
    )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def test_flux_schnell_makes_the_flux_pipelines_image_at_every_step_count_and_size(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """The family is told from the pipeline (FlowMatchEuler without shifting, no guidance embedding); its images
    are FluxPipeline's at 1–4 steps and at sizes of its own; mixed in one batch, each is the one it gets alone."""
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 256))  # native: 128 latent cells
    engine.load()
    assert (engine.spec.family, engine.spec.steps, engine.spec.guidance.mode) == ("flux-schnell", [1, 2, 3, 4], "none")
    assert engine.sampler.recipe.sigmas[4] == [1.0, 0.75, 0.5, 0.25]
    one = ImageItem(PROMPT, 1, 2)
    assert (engine.spec.nfe(one), engine.spec.cost(one)) == (2, 3)  # the T5 encoding is charged as a step
    items = [
        ImageItem(PROMPT, 1, 1, width=64, height=64),
        ImageItem("a blue square", 2, 4, width=48, height=64),
        ImageItem(PROMPT, 3, 2, width=64, height=32),
        ImageItem("a green cross", 4, 3, width=32, height=32),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        assert isinstance(got, ImageResult) and got.pixels.shape == (item.height, item.width, 3)
        theirs = diffusers_flux(tiny_pipelines["flux"], engine, item)
        assert np.abs(got.pixels.astype(int) - theirs.astype(int)).max() <= 2, item
        (alone,) = engine.run([item])
        assert isinstance(alone, ImageResult) and np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1
    (other,) = engine.run([ImageItem(PROMPT, 9, 1, width=64, height=64)])
    assert isinstance(other, ImageResult) and np.abs(other.pixels.astype(int) - together[0].pixels).mean() > 1
    (bad,) = engine.run([ImageItem(PROMPT, 1, 1, width=30, height=32)])
    assert isinstance(bad, InvalidRequest) and "multiple of 4" in str(bad)


def test_the_prompt_cache_keeps_the_recent_prompts_within_its_byte_budget(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    from fewstep.models.latent_sampler import text_bytes

    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    probe = LatentEngine(registry.version_dir(name, version), sides=(16, 256))
    probe.load()
    one = text_bytes(probe.sampler.text([("x", None)])[0])  # a T5 encoding: 256 tokens × 32
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 256), prompt_cache_bytes=2 * one)
    engine.load()
    items = [ImageItem(p, 1, 1, width=32, height=32) for p in ("a red circle", "a blue square", "a green cross")]
    first = engine.run(items)  # three prompts in one batch: more than the budget holds, none lost
    cache = engine.sampler._cache
    assert list(cache) == [("a blue square", None), ("a green cross", None)] and engine.sampler._cache_bytes == 2 * one
    engine.run([items[1]])  # a hit moves it to the back: the next new prompt drops "a green cross"
    engine.run([ImageItem("a white ring", 1, 1, width=32, height=32)])
    assert list(cache) == [("a blue square", None), ("a white ring", None)]
    again = engine.run(items)
    for a, b in zip(first, again, strict=True):
        assert isinstance(a, ImageResult) and isinstance(b, ImageResult) and np.array_equal(a.pixels, b.pixels)


def start_image(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A starting image for edits: a smooth colour field with a square in it (what a VAE keeps)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([200 * x + 30, 180 * y + 40, 120 + 60 * np.sin(6 * x + seed)], axis=-1)
    img[height // 4 : height // 2, width // 4 : width // 2] = (230, 40, 40)
    return img.clip(0, 255).astype(np.uint8)


def edit_item(seed: int, steps: int, strength: float, height: int = 64, width: int = 64, **kw: Any) -> ImageItem:
    from fewstep.engines.pixels import encode_png

    b64 = encode_png(start_image(seed, height, width))
    size = {} if (height, width) == (64, 64) else {"width": width, "height": height}
    return ImageItem(PROMPT, seed, steps, image=b64, strength=strength, **size, **kw)


def diffusers_edit(src: Path, engine: LatentEngine, item: ImageItem) -> np.ndarray:
    """The diffusers img2img pipeline's own image for an edit item: the family's scheduler, the item's starting
    image, and the engine's noise (the VAE posterior sampled with (seed, ENCODE_DRAW), the image noised with
    (seed, 0), the noise of the scheduler's k-th step from (seed, k), k counted over the whole list)."""
    import diffusers
    from PIL import Image

    from fewstep.engines.pixels import decode_png
    from fewstep.models.schedules import ENCODE_DRAW, kept_steps

    arch = engine.manifest["pipeline"]["arch"]
    cls = diffusers.StableDiffusionImg2ImgPipeline if arch == "sd" else diffusers.StableDiffusionXLImg2ImgPipeline
    assert item.image is not None and item.strength is not None
    w, h = item.width or engine.spec.width, item.height or engine.spec.height
    noise = {
        "scheduler": drawing(item.seed, counter(item.steps - kept_steps(item.steps, item.strength))),
        cls.__module__: drawing(item.seed, 0),
        "diffusers.models.autoencoders.vae": drawing(item.seed, ENCODE_DRAW),
    }
    image = Image.fromarray(decode_png(item.image, w, h))
    return run_diffusers(cls, src, engine, item, noise, image=image, strength=item.strength)


@pytest.mark.slow  # every UNet family against its pipeline: 18 s of the fast layer, which is at its budget
@pytest.mark.parametrize(("arch", "family"), [_case(a, f) for a, f in CASES])
def test_every_familys_edit_is_the_diffusers_img2img_pipelines(
    tiny_pipelines: dict[str, Path], tmp_path: Path, arch: str, family: str
) -> None:
    """An edit keeps diffusers' timesteps for its strength (int(steps × strength), the last of the list) and
    makes the img2img pipeline's image; it starts from its image, not from noise alone."""
    engine = _engine(tiny_pipelines, tmp_path, arch, family)
    src = tiny_pipelines[f"{arch}-lcm" if family == "lcm" else arch]
    counts = [n for n in engine.spec.steps if int(n * 0.6) >= 1][:2]
    for steps in counts:
        item = edit_item(3, steps, 0.6)
        (ours,) = engine.run([item])
        assert isinstance(ours, ImageResult) and ours.nfe == int(steps * 0.6)
        theirs = diffusers_edit(src, engine, item)
        assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2, (family, steps)
    (plain,) = engine.run([ImageItem(PROMPT, 3, counts[-1])])
    assert isinstance(plain, ImageResult) and not np.array_equal(plain.pixels, ours.pixels)


@pytest.mark.slow  # FluxImg2ImgPipeline loaded twice
def test_a_flux_schnell_edit_is_the_flux_img2img_pipelines(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    """FluxImg2ImgPipeline's rule and draws: from sigma int(steps − steps × strength) on (the flow pipelines' own
    count, not the UNet pipelines'), the image's latents (shifted and scaled) noised by `scale_noise` with the
    (seed, 0) noise, the posterior sampled with (seed, ENCODE_DRAW)."""
    import diffusers
    from PIL import Image

    from fewstep.engines.pixels import decode_png
    from fewstep.models.schedules import ENCODE_DRAW

    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 256))
    engine.load()
    recipe = engine.sampler.recipe
    for steps, strength, kept in [(4, 0.5, 2), (3, 0.7, 3)]:  # the flow pipelines' rule: 3 steps at 0.7 keep 3
        item = dataclasses.replace(edit_item(5, steps, strength), width=64, height=64)  # native is 256
        (ours,) = engine.run([item])
        assert isinstance(ours, ImageResult) and ours.nfe == kept
        pipe = diffusers.FluxImg2ImgPipeline.from_pretrained(str(tiny_pipelines["flux"]))
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
        noise = {
            "diffusers.pipelines.flux.pipeline_flux_img2img": drawing(item.seed, 0),
            "diffusers.models.autoencoders.vae": drawing(item.seed, ENCODE_DRAW),
        }
        patched = {importlib.import_module(m): f for m, f in noise.items()}
        real = {m: m.randn_tensor for m in patched}
        for m, f in patched.items():
            m.randn_tensor = f
        try:
            out = pipe(
                item.prompt, image=Image.fromarray(decode_png(item.image or "", 64, 64)), strength=strength,
                num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                max_sequence_length=recipe.max_sequence_length, output_type="np",
            )  # fmt: skip
        finally:
            for m, f in real.items():
                m.randn_tensor = f
        theirs = (out.images[0] * 255).round().astype(np.uint8)
        assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2, (steps, strength)


def test_edits_and_text_to_image_share_a_batch_and_each_image_is_its_own(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    engine = _engine(tiny_pipelines, tmp_path, "sd", "turbo")
    items = [
        edit_item(1, 4, 0.5),
        ImageItem(PROMPT, 2, 3),
        edit_item(3, 2, 1.0, height=32, width=48),
        edit_item(4, 4, 0.75),
    ]
    together = engine.run(items)
    for item, got in zip(items, together, strict=True):
        (alone,) = engine.run([item])
        assert isinstance(got, ImageResult) and isinstance(alone, ImageResult)
        assert np.abs(got.pixels.astype(int) - alone.pixels.astype(int)).max() <= 1
    theirs = diffusers_edit(tiny_pipelines["sd"], engine, items[2])
    assert np.abs(together[2].pixels.astype(int) - theirs.astype(int)).max() <= 2


def test_edits_the_rule_cannot_serve_are_refused_naming_it(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(tiny_pipelines, tmp_path, "sd", "turbo")
    cases = [
        (edit_item(1, 1, 0.5), "`strength` × `steps` must be at least 1"),
        (edit_item(1, 2, 0.0), "`strength` must be a number in (0, 1]. Given: 0.0"),
        (edit_item(1, 2, 1.5), "`strength` must be a number in (0, 1]. Given: 1.5"),
        (ImageItem(PROMPT, 1, 2, image="bm90IGEgcG5n", strength=0.5), "the starting image does not decode"),
    ]
    for item, needle in cases:
        (out,) = engine.run([item])
        assert isinstance(out, InvalidRequest) and needle in str(out), (needle, out)
    assert engine.spec.edit_steps(0.5) == 2  # turbo's default, 1 step, keeps none at 0.5: the next count does
    onnx = latent_spec(engine.manifest, "1", "onnxruntime", "fp32", None)
    assert not onnx.edits and "VAE encoder" in (onnx.edits_reason or "")


def _pair(tiny_pipelines: dict[str, Path], tmp: Path, handoff: str) -> tuple[LatentEngine, Path]:
    """SDXL base (the teacher) and a DMD2-style student UNet over the same VAE and text encoders."""
    from safetensors.torch import load_file, save_file

    registry = Registry(tmp / "registry")
    import_pipeline(tiny_pipelines["sdxl"], "base", registry, family="base")
    state = load_file(str(tiny_pipelines["sdxl"] / "unet/diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(3)
    save_file(
        {k: v + 0.05 * v.std().nan_to_num(0) * torch.randn(v.shape, generator=g) for k, v in state.items()},
        str(tmp / "student.safetensors"),
    )
    name, version = import_pipeline(
        tiny_pipelines["sdxl"],
        "student",
        registry,
        family="dmd2",
        unet=tmp / "student.safetensors",
        teacher="base",
        handoff=handoff,
    )
    folder = registry.version_dir(name, version)
    engine = LatentEngine(
        folder, teacher_folder=registry.named_dir(registry.manifest(name, version), "teacher"), sides=(16, 128)
    )
    engine.load()
    return engine, tmp / "student.safetensors"


def _recipe_run(
    tiny_pipelines: dict[str, Path], student_weights: Path, engine: LatentEngine, item: ImageItem, handoff: str
) -> np.ndarray:
    """The hybrid recipe run through diffusers' own parts: the base UNet at the first timestep, through the
    student's LCM step (renoise) or a deterministic DDIM step to the next timestep (trajectory), then the
    student UNet."""
    import diffusers
    from safetensors.torch import load_file

    from fewstep.models.schedules import step_generator

    src = tiny_pipelines["sdxl"]
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(src))
    base = pipe.unet
    student = diffusers.UNet2DConditionModel.from_config(base.config)
    student.load_state_dict(load_file(str(student_weights)))
    embeds, _, pooled, _ = pipe.encode_prompt(item.prompt, do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    sched = diffusers.LCMScheduler.from_config(engine.sampler.recipe.scheduler_config)
    sched.set_timesteps(timesteps=engine.sampler.recipe.timesteps[item.steps])
    latents = item_noise(item.seed, 0, (1, 4, 32, 32)) * sched.init_noise_sigma
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            unet = base if k == 0 else student
            eps = unet(
                sched.scale_model_input(latents, t), t, encoder_hidden_states=embeds, added_cond_kwargs=added
            ).sample
            if k == 0 and handoff == "trajectory":
                ddim = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
                ddim.set_timesteps(len(sched.timesteps))
                latents = ddim.step(eps, t, latents, eta=0.0).prev_sample
            else:
                latents = sched.step(eps, t, latents, generator=step_generator(item.seed, k + 1)).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((image[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("handoff", ["renoise", "trajectory"])
def test_the_hybrid_of_an_imported_pair_is_the_papers_recipe(
    tiny_pipelines: dict[str, Path], tmp_path: Path, handoff: str
) -> None:
    engine, weights = _pair(tiny_pipelines, tmp_path, handoff)
    assert engine.spec.hybrid
    item = ImageItem(PROMPT, 11, 4, hybrid=True)
    (ours,) = engine.run([item])
    assert isinstance(ours, ImageResult) and ours.nfe == 4  # the base's step (no CFG: guidance 0) + 3 of the student's
    assert (
        np.abs(ours.pixels.astype(int) - _recipe_run(tiny_pipelines, weights, engine, item, handoff).astype(int)).max()
        <= 2
    )
    (plain,) = engine.run([ImageItem(PROMPT, 11, 4)])
    assert isinstance(plain, ImageResult) and not np.array_equal(plain.pixels, ours.pixels)
    crowd = engine.run([ImageItem("a blue square", 2, 4), item, ImageItem(PROMPT, 12, 4, hybrid=True)])
    assert isinstance(crowd[1], ImageResult) and np.abs(crowd[1].pixels.astype(int) - ours.pixels).max() <= 1
    (one,) = engine.run([ImageItem(PROMPT, 1, 4, hybrid=True, width=48, height=48)])
    assert isinstance(one, ImageResult)


def _flux_pair(tiny_pipelines: dict[str, Path], tmp: Path, handoff: str | None) -> tuple[LatentEngine, Path]:
    """A FLUX-style base (the teacher) and a student whose transformer is the base's, perturbed, over the same VAE
    and text encoders (how a Qwen-Image + Lightning or a Z-Image + Turbo pair shares them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    registry = Registry(tmp / "registry")
    import_pipeline(tiny_pipelines["flux"], "flux-base", registry, family="base")
    student = tmp / "student"
    shutil.copytree(tiny_pipelines["flux"], student)
    weights = student / "transformer/diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(5)
    state = load_file(str(weights))
    save_file({k: v + 0.2 * v.std().nan_to_num(0) * torch.randn(v.shape, generator=g) for k, v in state.items()},
              str(weights))  # fmt: skip
    name, version = import_pipeline(student, "flux-student", registry, teacher="flux-base", handoff=handoff)
    folder = registry.version_dir(name, version)
    teacher = registry.named_dir(registry.manifest(name, version), "teacher")
    engine = LatentEngine(folder, teacher_folder=teacher, sides=(16, 256))
    engine.load()
    return engine, student


@pytest.mark.slow  # two imports and FluxPipeline loaded twice
def test_a_flow_pairs_hybrid_follows_the_base_models_ode_by_default(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """The hybrid of a flow pair hands off along the base model's ODE unless told otherwise: its image is
    FluxPipeline's with the base transformer for the first step and the student's for the rest."""
    import diffusers

    engine, student = _flux_pair(tiny_pipelines, tmp_path, None)
    assert engine.manifest["hybrid"]["handoff"] == "trajectory" and engine.spec.hybrid
    item = ImageItem(PROMPT, 11, 3, hybrid=True, width=64, height=64)
    (ours,) = engine.run([item])
    assert isinstance(ours, ImageResult) and ours.nfe == 3

    pipe = diffusers.FluxPipeline.from_pretrained(str(tiny_pipelines["flux"]))
    pipe.set_progress_bar_config(disable=True)
    theirs_student = diffusers.FluxTransformer2DModel.from_pretrained(str(student / "transformer"))

    def to_student(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        p.transformer = theirs_student  # the base model's step is done: the student takes the rest
        return {}

    c, f = engine.sampler.channels, engine.sampler.factor
    latents = pipe._pack_latents(item_noise(item.seed, 0, (1, c, 64 // f, 64 // f)), 1, c, 64 // f, 64 // f)
    out = pipe(
        PROMPT, num_inference_steps=3, guidance_scale=0.0, height=64, width=64, latents=latents, output_type="np",
        max_sequence_length=engine.sampler.recipe.max_sequence_length, callback_on_step_end=to_student,
    )  # fmt: skip
    theirs = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2
    (plain,) = engine.run([ImageItem(PROMPT, 11, 3, width=64, height=64)])
    assert isinstance(plain, ImageResult) and np.abs(plain.pixels.astype(int) - ours.pixels).mean() > 1


class MeanImageBase:
    """A flow base model whose x0 estimate is one image at every point, as a trained flow model's is at σ = 1 (its
    best estimate of x0 from pure noise is the data mean): v = (x − M) / σ."""

    arch, time_cond_dim = "flux", None

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: Any, mask: Any = None) -> torch.Tensor:
        return (sample - self.mean) / (timestep.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("handoff", ["renoise", "trajectory"])
def test_on_a_flow_pair_renoise_forgets_the_seeds_noise_and_trajectory_keeps_it(
    tiny_pipelines: dict[str, Path], tmp_path: Path, handoff: str
) -> None:
    from fewstep.models.latent_sampler import Draw, LatentSampler

    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    folder = registry.version_dir(name, version)
    student = LatentEngine(folder)
    student.load()
    manifest = {**student.manifest, "hybrid": {"handoff": handoff, "teacher_guidance": 0.0}}
    shape = (1, 4, 16, 16)
    mean = torch.linspace(-0.5, 0.5, 4 * 16 * 16).reshape(shape)
    sampler = LatentSampler(folder, manifest, student.sampler.nets, MeanImageBase(mean))  # type: ignore[arg-type]
    walks = sampler.start([Draw(PROMPT, seed, 4, 32, 32, hybrid=True) for seed in (3, 4)])
    sampler.advance(walks)  # the base model's step, σ 1 → 0.75
    for w in walks:
        assert torch.allclose(w.estimate, mean, atol=1e-5)  # the same x0 estimate for every seed  # type: ignore[arg-type]
        seeds_noise = item_noise(w.draw.seed, 0, shape)
        kept = torch.allclose(w.latents, 0.25 * mean + 0.75 * seeds_noise, atol=1e-5)
        fresh = torch.allclose(w.latents, 0.25 * mean + 0.75 * item_noise(w.draw.seed, 1, shape), atol=1e-5)
        assert (kept, fresh) == ((True, False) if handoff == "trajectory" else (False, True))
    while not all(w.done for w in walks):
        sampler.advance(walks)
    assert all(p is not None for p in sampler.decode(walks))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_networks_keep_the_scheduler_in_float32(
    tiny_pipelines: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    """What CUDA serving uses, run here on the CPU: networks in a half type, latents and steps in float32; a VAE
    that asks to be upcast (`force_upcast`) decodes in float32 under float16."""
    from fewstep.evaluation.metrics import psnr

    full = _engine(tiny_pipelines, tmp_path / "a", "sdxl", "lcm")
    registry = Registry(tmp_path / "a" / "registry")
    half = LatentEngine(registry.version_dir("sdxl-lcm", "1"), dtype=dtype, sides=(16, 128))
    half.load()
    nets = half.sampler.nets  # type: ignore[union-attr]
    assert next(nets.unet_model.parameters()).dtype == getattr(torch, dtype)  # type: ignore[attr-defined]
    upcast = dtype == "float16" and nets.vae.config.force_upcast  # type: ignore[attr-defined]
    assert nets.vae_dtype == (torch.float32 if upcast else getattr(torch, dtype))  # type: ignore[attr-defined]
    items = [ImageItem(PROMPT, 1, 4), ImageItem("a blue box", 2, 2, width=32, height=48)]
    for a, b in zip(full.run(items), half.run(items), strict=True):
        assert isinstance(a, ImageResult) and isinstance(b, ImageResult)
        assert 35.0 <= psnr(a.pixels, b.pixels) < float("inf")  # close, and really computed in another type


def _bloated(manifest: dict[str, Any], what: str) -> dict[str, Any]:
    """A manifest edited as a registry written by hand could be: each edit alone makes every item, warm-up and
    gate probe slow or huge."""
    out = json.loads(json.dumps(manifest))
    recipe = out["recipe"]
    if what == "steps":
        recipe["timesteps"] = {"999": list(range(999, 0, -1))}
        recipe["default_steps"] = 999
    elif what == "train":
        recipe["scheduler_config"]["num_train_timesteps"] = 10**7
    elif what == "native":
        out["native_size"] = "200000x200000"
    else:
        out["native_size"] = "2048x2048"
    return out


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("steps", "the recipe's 999-step list must be 999 timesteps in [0, 1000), with at most 16 steps"),
        ("train", "`num_train_timesteps` must be an integer from 1 to 10000. Given: 10000000"),
        ("native", "native size '200000x200000' is not WxH with sides from 1 to 8192"),
        ("past-max-side", "its native size 2048x2048 is larger than `image_max_side` = 1024"),
    ],
)
def test_a_manifest_that_would_make_every_item_slow_or_huge_is_refused(
    tiny_pipelines: dict[str, Path], tmp_path: Path, what: str, needle: str
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "sd", registry, family="turbo")
    manifest = _bloated(registry.manifest(name, version), what)
    with pytest.raises(CheckpointError) as refused:
        latent_spec(manifest, version, "torch", "fp32", (64, 1024))
    assert needle in str(refused.value), refused.value
