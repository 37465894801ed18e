"""Pipeline architectures as data: each entry's geometry from its configs, and what adding one takes (an entry and
its adapter: `fewstep import`, the sampler and the engine need nothing else)."""

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
from fewstep.errors import CheckpointError
from fewstep.models import architectures
from fewstep.models.architectures import ARCHITECTURES, Architecture, Conditioning, UNetSD, by_pipeline
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry


def test_each_architecture_reads_its_geometry_from_the_configs(tiny_pipelines: dict[str, Path]) -> None:
    def configs(src: Path, network: str) -> tuple[dict[str, Any], dict[str, Any]]:
        return json.loads((src / network / "config.json").read_text()), json.loads(
            (src / "vae/config.json").read_text()
        )

    sd = ARCHITECTURES["sd"].adapter.geometry(*configs(tiny_pipelines["sd"], "unet"))
    assert (sd.side, sd.channels, sd.vae_factor, sd.multiple) == (64, 4, 2, 4)
    flux = ARCHITECTURES["flux"].adapter.geometry(*configs(tiny_pipelines["flux"], "transformer"))
    assert (flux.side, flux.channels, flux.vae_factor, flux.multiple) == (256, 4, 2, 4)  # 2×2 patches: 2 × factor
    network, vae = configs(tiny_pipelines["flux"], "transformer")
    with pytest.raises(CheckpointError, match=r"`in_channels` must be the VAE's 4 latent channels × 4"):
        ARCHITECTURES["flux"].adapter.geometry({**network, "in_channels": 8}, vae)
    assert by_pipeline("FluxPipeline").name == "flux" and by_pipeline("StableDiffusionXLPipeline").name == "sdxl"
    with pytest.raises(CheckpointError, match="pipeline class 'PixArtSigmaPipeline' is not supported"):
        by_pipeline("PixArtSigmaPipeline")


class Counting(UNetSD):
    """A new architecture's adapter: SD's conventions, counting the denoiser calls it makes."""

    calls = 0

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        Counting.calls += 1
        return super().denoise(network, sample, timestep, cond)


def test_an_architecture_is_one_entry_and_one_adapter(
    tiny_pipelines: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline class fewstep has never seen is imported and served once the table has its entry."""
    src = tmp_path / "mine"
    shutil.copytree(tiny_pipelines["sd"], src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyStudentPipeline"}))
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match="'MyStudentPipeline' is not supported"):
        import_pipeline(src, "mine", registry, family="turbo")

    sd = ARCHITECTURES["sd"]
    entry = Architecture(
        "mine", ("MyStudentPipeline",), "unet", sd.components, sd.encoders, sd.tokenizers, "unet", Counting()
    )
    monkeypatch.setitem(architectures.ARCHITECTURES, "mine", entry)
    name, version = import_pipeline(src, "mine", registry, family="turbo")
    base, base_version = import_pipeline(tiny_pipelines["sd"], "base-sd", registry, family="turbo")
    mine = LatentEngine(registry.version_dir(name, version))
    ref = LatentEngine(registry.version_dir(base, base_version))
    for engine in (mine, ref):
        engine.load()
    item = ImageItem("a red circle", 4, 2)
    (got,), (want,) = mine.run([item]), ref.run([item])
    assert isinstance(got, ImageResult) and isinstance(want, ImageResult)
    assert np.array_equal(got.pixels, want.pixels) and Counting.calls == 2  # its adapter ran each step
    assert json.loads((registry.version_dir(name, version) / "manifest.json").read_text())["pipeline"]["arch"] == "mine"
