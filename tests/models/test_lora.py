"""Distillation LoRAs fused at import: the served image equals diffusers' `load_lora_weights` + `fuse_lora` on the
same pipeline (a UNet family and FLUX), the manifest records the file and the scale, and bad files are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError
from fewstep.models.importing import import_pipeline
from fewstep.models.lora import read_lora
from fewstep.models.registry import Registry
from fewstep.models.schedules import item_noise

pytestmark = pytest.mark.slow  # each builds a LoRA with peft and loads pipelines through diffusers twice
PROMPT = "a red circle on a white table"


def make_lora(src: Path, out: Path, cls_name: str, network: str, targets: list[str]) -> Path:
    """A random LoRA (rank 4) on `network`'s `targets`, saved as the pipeline class saves LoRAs."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(src))
    net = getattr(pipe, network)
    torch.manual_seed(11)
    net.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    layers = get_peft_model_state_dict(net)
    cls.save_lora_weights(str(out), **{f"{network}_lora_layers": layers}, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def diffusers_fused(src: Path, cls_name: str, lora: Path, scale: float) -> Any:
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay (diffusers' documented way to keep a fused LoRA)
    return pipe


def test_a_unet_students_lora_is_fused_as_diffusers_fuses_it(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    import diffusers

    from fewstep.models.families import scheduler_class

    lora = make_lora(
        tiny_pipelines["sd"], tmp_path / "lora", "StableDiffusionPipeline", "unet", ["to_q", "to_k", "to_v"]
    )
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "fused", registry, family="turbo", lora=lora, lora_scale=0.7)
    folder = registry.version_dir(name, version)
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["imported"]["lora"]
    assert record["file"] == lora.name and record["scale"] == 0.7 and record["fused_into"] == ["unet"]
    assert len(record["sha256"]) == 64
    engine = LatentEngine(folder)
    engine.load()
    item = ImageItem(PROMPT, 5, 2)
    (ours,) = engine.run([item])
    pipe = diffusers_fused(tiny_pipelines["sd"], "StableDiffusionPipeline", lora, 0.7)
    recipe = engine.sampler.recipe
    pipe.scheduler = scheduler_class(recipe.scheduler).from_config(recipe.scheduler_config)
    module = __import__(type(pipe.scheduler).__module__, fromlist=["randn_tensor"])
    drawn = [0]

    def noise(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None) -> Any:
        drawn[0] += 1
        return item_noise(5, drawn[0], tuple(shape))

    real, module.randn_tensor = module.randn_tensor, noise
    try:
        out = pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, latents=item_noise(5, 0, (1, 4, 32, 32)),
                   output_type="np")  # fmt: skip
    finally:
        module.randn_tensor = real
    theirs = (out.images[0] * 255).round().astype(np.uint8)
    assert isinstance(ours, ImageResult) and np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2
    plain_name, plain_version = import_pipeline(tiny_pipelines["sd"], "plain", registry, family="turbo")
    plain = LatentEngine(registry.version_dir(plain_name, plain_version))
    plain.load()
    (base,) = plain.run([item])
    assert isinstance(base, ImageResult) and np.abs(base.pixels.astype(int) - ours.pixels.astype(int)).max() > 2
    del diffusers


def test_a_flux_lora_is_fused_into_the_transformer(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    from tests.engines.test_latent import diffusers_flux

    lora = make_lora(tiny_pipelines["flux"], tmp_path / "lora", "FluxPipeline", "transformer", ["to_q", "to_k", "to_v"])
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "fused", registry, lora=lora)
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 256))
    engine.load()
    item = ImageItem(PROMPT, 2, 4, width=64, height=64)
    (ours,) = engine.run([item])
    fused = tmp_path / "fused-pipeline"
    diffusers_fused(tiny_pipelines["flux"], "FluxPipeline", lora, 1.0).save_pretrained(str(fused))
    theirs = diffusers_flux(fused, engine, item)
    assert isinstance(ours, ImageResult) and np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2


def test_bad_lora_files_are_refused(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="safetensors files only"):
        import_pipeline(tiny_pipelines["sd"], "x", registry, family="turbo", lora=pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_lora(broken)
    from safetensors.torch import save_file

    stranger = tmp_path / "stranger.safetensors"
    save_file({"some.other.model.lora_A.weight": torch.ones(4, 8)}, str(stranger))
    with pytest.raises(CheckpointError, match=r"changed no weight|does not apply"):
        import_pipeline(tiny_pipelines["sd"], "x", registry, family="turbo", lora=stranger)
    with pytest.raises(CheckpointError, match=r"--lora-scale must be in \(0, 4\]"):
        import_pipeline(tiny_pipelines["sd"], "x", registry, family="turbo", lora=stranger, lora_scale=0.0)
    assert registry.promoted("x") is None  # nothing was written
