"""TensorRT backend: what can be checked without a GPU, and a GPU test that runs where CUDA exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.engines.backends import backend
from fewstep.engines.backends.tensorrt import (
    DEFAULT_PROFILES,
    ShapeProfile,
    TensorRTBackend,
    cache_key,
    select_profile,
    split_batches,
)
from fewstep.errors import CheckpointError


def test_profile_selection_picks_the_narrowest_range_that_holds_the_batch() -> None:
    assert select_profile(1) == 0
    assert select_profile(8) == 1
    assert select_profile(16) == 1
    assert select_profile(17) == 2
    with pytest.raises(ValueError, match="exceeds every profile"):
        select_profile(65)
    wide = (ShapeProfile(1, 8, 64), ShapeProfile(4, 8, 8))
    assert select_profile(6, wide) == 1


def test_oversized_batches_are_split_to_fit() -> None:
    assert split_batches(10) == [(0, 10)]
    assert split_batches(150) == [(0, 64), (64, 128), (128, 150)]
    assert all(any(p.holds(b - a) for p in DEFAULT_PROFILES) for a, b in split_batches(150))


def test_cache_key_changes_with_anything_that_invalidates_an_engine() -> None:
    base = cache_key("a" * 64, "NVIDIA H100", "10.9", "fp16")
    assert base == cache_key("a" * 64, "NVIDIA H100", "10.9", "fp16")
    others = {
        cache_key("b" * 64, "NVIDIA H100", "10.9", "fp16"),
        cache_key("a" * 64, "NVIDIA H200", "10.9", "fp16"),
        cache_key("a" * 64, "NVIDIA H100", "10.10", "fp16"),
        cache_key("a" * 64, "NVIDIA H100", "10.9", "int8"),
        cache_key("a" * 64, "NVIDIA H100", "10.9", "fp16", (ShapeProfile(1, 1, 4),)),
    }
    assert base not in others and len(others) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_without_a_gpu_the_backend_refuses_with_a_clear_reason(checkpoints: Path) -> None:
    manifest = json.loads((checkpoints / "shapes" / "manifest.json").read_text())
    with pytest.raises(CheckpointError, match="tensorrt"):
        backend("tensorrt").image(checkpoints / "shapes", manifest, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensorrt_fp16_matches_onnx_fp32(exported, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    from fewstep.engines.base import ImageItem, ImageResult
    from fewstep.engines.image import ImageEngine

    folder = exported.version_dir("shapes", "1")
    trt_engine = ImageEngine(folder, encoder, backend="tensorrt", precision="fp16", trt_cache=tmp_path / "cache")
    ort_engine = ImageEngine(folder, encoder, backend="onnxruntime", precision="fp32")
    trt_engine.load()
    ort_engine.load()
    items = [ImageItem("a red circle", i, 1 + i % 4) for i in range(8)]
    for a, b in zip(trt_engine.run(items), ort_engine.run(items), strict=True):
        assert isinstance(a, ImageResult) and isinstance(b, ImageResult)
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean() < 2
    assert any((tmp_path / "cache").glob("*.plan"))


def test_a_cached_plan_is_used_only_if_its_manifest_vouches_for_its_bytes(tmp_path: Path) -> None:
    from fewstep.engines.backends.plans import load_plan, store_plan

    cache, key = tmp_path / "cache", cache_key("a" * 64, "NVIDIA H100", "10.9", "fp16")
    assert load_plan(cache, key) is None  # nothing built yet
    store_plan(cache, key, b"engine bytes", {"artifact": "model.fp32.onnx", "sha256": "a" * 64})
    assert load_plan(cache, key) == b"engine bytes"
    assert json.loads((cache / f"{key}.plan.json").read_text())["source"]["artifact"] == "model.fp32.onnx"
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # temp names went away
    (cache / f"{key}.plan").write_bytes(b"engine bytez")  # tampered in the shared cache, same size
    assert load_plan(cache, key) is None
    store_plan(cache, key, b"engine bytes", {})  # the rebuild replaces it
    (cache / f"{key}.plan.json").unlink()  # a plan dropped into the cache without a manifest
    assert load_plan(cache, key) is None


def test_plans_are_kept_where_the_trt_cache_setting_says(tmp_path: Path, checkpoints: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    from fewstep.models.registry import Registry
    from fewstep.service.kinds import KINDS, Context, Version
    from fewstep.service.settings import Settings

    settings = Settings(registry=tmp_path / "registry", backend="tensorrt", precision="fp16", trt_cache=tmp_path / "p")
    ctx = Context(settings, Registry(settings.registry), _encoder=encoder)
    ctx.registry.publish(checkpoints / "shapes", version="1")
    v = Version("shapes", "1", ctx.registry.version_dir("shapes", "1"), ctx.registry.manifest("shapes", "1"))
    engine = KINDS["image"].engine(ctx, v)
    chosen = backend(engine.backend, engine.trt_cache)  # what `load` builds its plans with
    assert isinstance(chosen, TensorRTBackend) and chosen.cache == tmp_path / "p"
    assert backend("tensorrt").cache == Settings.model_fields["trt_cache"].default  # type: ignore[attr-defined]
