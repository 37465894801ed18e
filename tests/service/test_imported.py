"""A user's imported pipeline served over HTTP by the gateway (in process): mixed step counts and sizes share
batches and every image is the one it gets alone; a broken push (a NaN UNet) is refused while the version
serving goes on; `/v1/models` says what the model takes."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.evaluation.metrics import psnr
from fewstep.exporters.pipeline_onnx import export_pipeline_onnx
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from tests.service.gateway import in_process, settings

pytestmark = pytest.mark.anyio
GEN = "/v1/images/generations"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


async def _wait(c: httpx.AsyncClient, version: str, status: str) -> str | None:
    deadline = time.monotonic() + 60
    while True:
        card = next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == "tiny")
        versions = {v["version"]: v for v in card["versions"]}
        if version in versions and versions[version]["status"] == status:
            return versions[version]["reason"]
        assert time.monotonic() < deadline, versions
        await asyncio.sleep(0.05)


@pytest.mark.slow  # a gateway lifecycle waited on for seconds: the fast layer is at its budget
async def test_an_imported_student_serves_mixed_batches_and_survives_a_broken_push(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    import_pipeline(tiny_pipelines["sdxl"], "tiny", registry, family="turbo")
    config = settings(
        tmp_path,
        checkpoints=tmp_path / "none",
        engine="registry",
        image_min_side=16,
        image_max_side=128,
        max_batch_size=8,
    )
    async with in_process(config) as c:
        card = next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == "tiny")
        assert card["family"] == "turbo" and card["steps"] == [1, 2, 3, 4] and card["size"] == "64x64"
        assert card["sizes"] == {"min": 16, "max": 128, "multiple": 4} and card["guidance"] == {"mode": "none"}
        assert card["edits"] is True  # on torch: the VAE encoder is there

        requests = [
            {"prompt": "a red circle", "seed": 1, "steps": 1},
            {"prompt": "a blue square", "seed": 2, "steps": 4, "size": "48x64"},
            {"prompt": "a red circle", "seed": 3, "steps": 2, "size": "64x32"},
            {"prompt": "a green cross", "seed": 4, "steps": 3},
            {"prompt": "a green cross", "seed": 5, "steps": 4, "size": "32x32"},
        ]
        together = await asyncio.gather(*(c.post(GEN, json={"model": "tiny", **r}) for r in requests))
        for r, got in zip(requests, together, strict=True):
            assert got.status_code == 200, got.text
            body = got.json()
            w, h = (int(v) for v in r.get("size", "64x64").split("x"))
            assert body["size"] == f"{w}x{h}" and body["steps"] == r["steps"] and body["nfe"] == r["steps"]
            alone = (await c.post(GEN, json={"model": "tiny", **r})).json()
            assert _pixels(body).shape == (h, w, 3)
            assert np.abs(_pixels(body).astype(int) - _pixels(alone).astype(int)).max() <= 1
        metrics = (await c.get("/metrics")).text
        sizes = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("fewstep_batch_size_sum")]
        counts = [
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("fewstep_batch_size_count")
        ]
        assert sum(sizes) > sum(counts)  # some steps ran more than one image

        bad = await c.post(GEN, json={"model": "tiny", "prompt": "x", "guidance_scale": 3})
        assert bad.status_code == 400 and "`guidance_scale` is not taken by this model" in bad.text

        # A push of broken weights: the gate refuses it (its warm-up makes non-finite images), version 1 serves on.
        version = registry.version_dir("tiny", "1")
        broken = tmp_path / "broken"
        shutil.copytree(tiny_pipelines["sdxl"], broken)
        state = load_file(str(broken / "unet/diffusion_pytorch_model.safetensors"))
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        save_file(state, str(broken / "unet/diffusion_pytorch_model.safetensors"))
        import_pipeline(broken, "tiny", registry, family="turbo")
        why = await _wait(c, "2", "refused")
        assert why is not None and "non-finite" in why
        ok = await c.post(GEN, json={"model": "tiny", "prompt": "a red circle", "seed": 1, "steps": 1})
        assert ok.status_code == 200 and ok.json()["model_version"] == "1"
        assert version.is_dir() and (await c.get("/readyz")).status_code == 200


@pytest.mark.slow  # exports the pipeline's graphs first
async def test_onnxruntime_serves_an_exported_pipeline_like_torch(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd-lcm"], "tiny", registry, family="lcm")
    folder = registry.version_dir(name, version)
    export_pipeline_onnx(folder)
    requests = [
        {"prompt": "a red circle", "seed": 1, "steps": 1},
        {"prompt": "a blue square", "seed": 2, "steps": 4, "size": "48x64", "guidance_scale": 3.0},
        {"prompt": "a green cross", "seed": 3, "steps": 8, "size": "32x32", "guidance_scale": 12.0},
    ]
    engine = LatentEngine(folder, sides=(16, 128))
    engine.load()
    items = []
    for r in requests:
        w, h = (int(v) for v in str(r.get("size", "64x64")).split("x"))
        items.append(
            ImageItem(
                str(r["prompt"]), int(r["seed"]), int(r["steps"]), width=w, height=h, guidance=r.get("guidance_scale")
            )
        )  # type: ignore[arg-type]
    reference = engine.run(items)
    config = settings(
        tmp_path,
        checkpoints=tmp_path / "none",
        engine="registry",
        backend="onnxruntime",
        image_min_side=16,
        image_max_side=128,
    )
    async with in_process(config) as c:
        card = next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == "tiny")
        assert card["backend"] == "onnxruntime" and card["guidance"]["mode"] == "embedded"
        got = await asyncio.gather(*(c.post(GEN, json={"model": "tiny", **r}) for r in requests))
        for r, resp, ref in zip(requests, got, reference, strict=True):
            assert resp.status_code == 200, resp.text
            assert isinstance(ref, ImageResult)
            assert psnr(_pixels(resp.json()), ref.pixels) >= 40.0, r


@pytest.mark.slow  # its warm-up runs every step count at the native 256×256
async def test_a_flux_schnell_student_is_served_over_http(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    import_pipeline(tiny_pipelines["flux"], "schnell", registry)
    config = settings(
        tmp_path, checkpoints=tmp_path / "none", engine="registry", image_min_side=16, image_max_side=256,
        gate_probe_seeds=1,
    )  # fmt: skip
    async with in_process(config, ready_within=300) as c:  # the gate's probes run at 256×256 too
        card = next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == "schnell")
        assert (card["family"], card["steps"], card["size"]) == ("flux-schnell", [1, 2, 3, 4], "256x256")
        assert card["sizes"] == {"min": 16, "max": 256, "multiple": 4} and card["guidance"] == {"mode": "none"}
        body = {"model": "schnell", "prompt": "a red circle", "seed": 3, "size": "64x48"}
        r = await c.post(GEN, json={**body, "steps": 2})
        assert r.status_code == 200, r.text
        assert _pixels(r.json()).shape == (48, 64, 3) and r.json()["nfe"] == 2
        engine = LatentEngine(registry.version_dir("schnell", "1"), sides=(16, 256))
        engine.load()
        (direct,) = engine.run([ImageItem("a red circle", 3, 2, width=64, height=48)])
        assert isinstance(direct, ImageResult)
        assert np.abs(_pixels(r.json()).astype(int) - direct.pixels.astype(int)).max() <= 1
        bad = await c.post(GEN, json={**body, "guidance_scale": 3.5})
        assert bad.status_code == 400 and "flux-schnell students have guidance distilled in" in bad.text
