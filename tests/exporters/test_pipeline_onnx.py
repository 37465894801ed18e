"""ONNX export of imported pipelines: fp32 graphs of both architectures served by ONNX Runtime within 40 dB of
fewstep's torch images at every step count, external data, quantized UNets behind their gate, and refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fewstep.artifacts.pipeline import artifact_dir, describe
from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.errors import CheckpointError
from fewstep.evaluation.metrics import psnr
from fewstep.exporters import pipeline_onnx
from fewstep.exporters.pipeline_onnx import export_pipeline_onnx, quantize_pipeline
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # traces and exports three graphs per pipeline

SIDES = (16, 128)


@pytest.fixture(scope="module")
def exported(tiny_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An SD-style turbo student (graphs inline) and an SDXL-style LCM student (guidance embedding, added
    conditions; every graph's weights forced into external data)."""
    registry = Registry(tmp_path_factory.mktemp("onnx") / "registry")
    out = {}
    for key, family, external in (("sd", "turbo", 1 << 40), ("sdxl-lcm", "lcm", 1024)):
        name, version = import_pipeline(tiny_pipelines[key], key, registry, family=family)
        out[key] = registry.version_dir(name, version)
        export_pipeline_onnx(out[key], external_data_bytes=external)
    return out


def _mixed(folder: Path) -> list[ImageItem]:
    """Every step count the family serves, at mixed sizes, in one batch."""
    engine = LatentEngine(folder)
    sizes = [(64, 64), (32, 48), (48, 32)]
    return [
        ImageItem(f"a shape number {n}", seed=100 + n, steps=n, width=sizes[n % 3][0], height=sizes[n % 3][1])
        for n in engine.spec.steps
    ]


def _run(folder: Path, items: list[ImageItem], backend: str = "torch", precision: str = "fp32") -> list[ImageResult]:
    engine = LatentEngine(folder, backend, precision, sides=SIDES)
    engine.load()
    out = engine.run(items)
    engine.close()
    assert all(isinstance(r, ImageResult) for r in out), out
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("key", ["sd", "sdxl-lcm"])
def test_onnxruntime_images_are_within_40_db_of_torch_at_every_step_count(exported: dict[str, Path], key: str) -> None:
    folder = exported[key]
    art = describe(folder, "fp32")
    recorded = art["parity"]["by_steps"]
    items = _mixed(folder)
    assert set(recorded) == {str(it.steps) for it in items}
    torch_images = _run(folder, items)
    ort_images = _run(folder, items, "onnxruntime")
    for it, a, b in zip(items, torch_images, ort_images, strict=True):
        assert a.pixels.shape == b.pixels.shape == (it.height, it.width, 3)
        assert psnr(a.pixels, b.pixels) >= 40.0, (it, psnr(a.pixels, b.pixels))


def test_graphs_over_the_threshold_keep_their_weights_outside(exported: dict[str, Path]) -> None:
    inline, external = describe(exported["sd"], "fp32"), describe(exported["sdxl-lcm"], "fp32")
    assert all(g["data"] is None for g in inline["graphs"].values())
    for role, g in external["graphs"].items():
        assert g["data"] is not None and (exported["sdxl-lcm"] / "onnx" / g["data"]["file"]).stat().st_size > 0, role
    assert external["graphs"]["unet"]["inputs"] == [
        "sample",
        "timestep",
        "states",
        "timestep_cond",
        "pooled",
        "time_ids",
    ]


def test_a_changed_graph_or_weights_file_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "1"
    shutil.copytree(exported["sdxl-lcm"], folder)
    data = folder / "onnx/fp32/unet.onnx.data"
    data.chmod(0o600)
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    engine = LatentEngine(folder, "onnxruntime")
    with pytest.raises(CheckpointError, match=r"unet\.onnx\.data does not match its recorded sha256"):
        engine.load()
    manifest = folder / "onnx/fp32/manifest.json"
    art = json.loads(manifest.read_text())
    art["source"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(art))
    with pytest.raises(CheckpointError, match="exported from other files"):
        LatentEngine(folder, "onnxruntime").load()


def test_a_failed_parity_check_leaves_nothing(
    tiny_pipelines: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "strict", registry, family="tcd")
    original = pipeline_onnx._graphs

    def miscompiled(nets: object, manifest: dict) -> dict:
        """The graphs, with the UNet exported from other weights than the torch reference's."""
        graphs = original(nets, manifest)  # type: ignore[arg-type]
        unet, *rest = graphs["unet"]
        wrong = copy.deepcopy(unet)
        with torch.no_grad():
            for p in wrong.parameters():
                p.mul_(1.5)
        graphs["unet"] = (wrong, *rest)
        return graphs

    monkeypatch.setattr(pipeline_onnx, "_graphs", miscompiled)
    with pytest.raises(CheckpointError, match="ONNX parity failed"):
        export_pipeline_onnx(registry.version_dir(name, version))
    assert not artifact_dir(registry.version_dir(name, version), "fp32").exists()
    assert [p.name for p in (registry.version_dir(name, version) / "onnx").iterdir()] == []


def test_int8_unet_is_calibrated_at_every_step_count_and_gated(exported: dict[str, Path]) -> None:
    folder = exported["sd"]
    art = quantize_pipeline(folder, "int8")
    steps = {str(n) for n in LatentEngine(folder).spec.steps}
    assert set(art["quality"]["psnr_db_vs_fp32_by_steps"]) == steps
    assert art["calibration"]["step_aware"] and art["calibration"]["unet_calls"] >= len(steps)
    assert art["graphs"]["unet"]["file"] == "int8/unet.onnx"
    assert art["graphs"]["text"] == describe(folder, "fp32")["graphs"]["text"]  # text and VAE stay fp32
    assert art["gate"]["passed"] == (min(art["quality"]["psnr_db_vs_fp32_by_steps"].values()) >= 25.0)
    items = _mixed(folder)
    fp32 = _run(folder, items, "onnxruntime")
    int8 = _run(folder, items, "onnxruntime", "int8")
    for a, b in zip(fp32, int8, strict=True):
        assert 20.0 <= psnr(a.pixels, b.pixels) < float("inf")  # quantized: close, and really different
    failed = dict(art, gate={"passed": False, "rule": "test"})
    (artifact_dir(folder, "int8") / "manifest.json").write_text(json.dumps(failed))
    with pytest.raises(CheckpointError, match="failed their quality gate"):
        LatentEngine(folder, "onnxruntime", "int8").load()


def test_fp8_is_refused_for_pipelines(exported: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="pipelines quantize to"):
        quantize_pipeline(exported["sd"], "fp8")


def test_a_flux_transformer_exports_within_40_db_and_its_dynamic_int8_is_gated(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """The FLUX transformer (packing, position ids and all) as one graph of symbolic batch and size: ONNX Runtime's
    images within 40 dB of torch's at every step count and at sizes other than the example's; its linear layers
    quantized dynamically to INT8 behind the PSNR gate."""
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    folder = registry.version_dir(name, version)
    art = export_pipeline_onnx(folder)
    assert set(art["parity"]["by_steps"]) == {"1", "2", "3", "4"}
    assert min(v for v in art["parity"]["by_steps"].values() if v is not None) >= 40.0
    sizes = [(64, 64), (32, 48), (48, 32), (16, 16)]
    items = [ImageItem(f"a shape number {n}", seed=n, steps=n, width=sizes[n - 1][0], height=sizes[n - 1][1])
             for n in (1, 2, 3, 4)]  # fmt: skip

    def run(backend: str, precision: str = "fp32") -> list[ImageResult]:
        engine = LatentEngine(folder, backend, precision, sides=(16, 256))
        engine.load()
        out = engine.run(items)
        assert all(isinstance(r, ImageResult) for r in out), out
        return out  # type: ignore[return-value]

    torch_images, ort_images = run("torch"), run("onnxruntime")
    for it, a, b in zip(items, torch_images, ort_images, strict=True):
        assert a.pixels.shape == b.pixels.shape == (it.height, it.width, 3)
        assert psnr(a.pixels, b.pixels) >= 40.0, (it, psnr(a.pixels, b.pixels))
    q = quantize_pipeline(folder, "int8-dynamic")
    assert q["gate"]["passed"] == (min(q["quality"]["psnr_db_vs_fp32_by_steps"].values()) >= 25.0)
    if q["gate"]["passed"]:
        for a, b in zip(ort_images, run("onnxruntime", "int8-dynamic"), strict=True):
            assert 20.0 <= psnr(a.pixels, b.pixels) < float("inf")
