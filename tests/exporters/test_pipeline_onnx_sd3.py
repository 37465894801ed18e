"""ONNX export of an imported SD3.5 Turbo student (`sd35-turbo`) on a tiny StableDiffusion3Pipeline: its three
text encoders as one graph (both CLIPs' states and T5's, both pooled outputs), its transformer (its own patches,
the timestep as the scheduler gives it) of symbolic batch and sides, the VAE decoder with its scale and shift;
ONNX Runtime's images within 40 dB of torch's at every step count and at sizes of their own, and its dynamic INT8
behind the PSNR gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.artifacts.pipeline import describe
from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.evaluation.metrics import psnr
from fewstep.exporters.pipeline_onnx import export_pipeline_onnx, quantize_pipeline
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from tests import pipelines

pytestmark = pytest.mark.slow  # exports a transformer through torch.export and samples it ~100 times

SIZES = ((64, 64), (36, 20), (20, 44), (16, 16))
"""Sides the export's example (8 pixels) never had, odd patch counts among them (36 px: 9 patches of 2×2 cells)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3 pipeline imported as an `sd35-turbo` student."""
    root = tmp_path_factory.mktemp("sd3-onnx")
    registry = Registry(root / "registry")
    name, version = import_pipeline(pipelines.sd3(root / "sd3"), "sd35", registry, family="sd35-turbo")
    return registry.version_dir(name, version)


def test_an_sd3_transformer_exports_within_40_db_and_its_dynamic_int8_is_gated(folder: Path) -> None:
    art = export_pipeline_onnx(folder)
    graphs = art["graphs"]
    assert (graphs["text"]["inputs"], graphs["text"]["outputs"]) == (["ids_0", "ids_1", "ids_2"], ["states", "pooled"])
    assert graphs["unet"]["inputs"] == ["sample", "timestep", "states", "pooled"]
    assert describe(folder, "fp32")["parity"] == art["parity"]
    assert set(art["parity"]["by_steps"]) == {"1", "2", "3", "4"}
    assert min(v for v in art["parity"]["by_steps"].values() if v is not None) >= 40.0
    items = [
        ImageItem(f"a shape number {n}", seed=n, steps=n, width=w, height=h)
        for n, (w, h) in zip((1, 2, 3, 4), SIZES, strict=True)
    ]

    def run(backend: str, precision: str = "fp32") -> list[ImageResult]:
        engine = LatentEngine(folder, backend, precision, sides=(16, 128))
        engine.load()
        out = engine.run(items)  # every step count and size in one batch
        engine.close()
        assert all(isinstance(r, ImageResult) for r in out), out
        return out  # type: ignore[return-value]

    torch_images, ort_images = run("torch"), run("onnxruntime")
    for it, a, b in zip(items, torch_images, ort_images, strict=True):
        assert a.pixels.shape == b.pixels.shape == (it.height, it.width, 3)
        assert psnr(a.pixels, b.pixels) >= 40.0, (it, psnr(a.pixels, b.pixels))
    q = quantize_pipeline(folder, "int8-dynamic")
    assert set(q["quality"]["psnr_db_vs_fp32_by_steps"]) == {"1", "2", "3", "4"}
    assert q["graphs"]["text"] == graphs["text"] and q["graphs"]["vae_decoder"] == graphs["vae_decoder"]
    assert q["gate"]["passed"] == (min(q["quality"]["psnr_db_vs_fp32_by_steps"].values()) >= 25.0)
    if q["gate"]["passed"]:
        for a, b in zip(ort_images, run("onnxruntime", "int8-dynamic"), strict=True):
            assert 20.0 <= psnr(a.pixels, b.pixels) < float("inf")  # quantized: close, and really different
