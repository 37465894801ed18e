"""The native TensorRT backend (GPU hosts): engines built from the ONNX artifacts and cached.

* FP16 is built from `model.fp32.onnx` with the FP16 flag; INT8 and FP8 from the QDQ graphs
  (`model.int8.onnx`, `model.fp8.onnx`), whose scales TensorRT takes as they are.
* Engines are cached under `FEWSTEP_TRT_CACHE` (the `trt_cache` setting, passed in as `cache`) by a key over
  (artifact sha256, GPU name, TensorRT version, shape profiles): a new GPU kind, TensorRT
  release or artifact builds anew; nothing else does. Each plan has a manifest with its sha256
  and is verified as it is read (`plans.py`); the ONNX graph is hashed as it is read for a build.
* Shape profiles cover batch ranges; a call uses the smallest profile whose range holds its
  batch, and a batch above every profile is split.

Verified on CPU: cache keys, profile selection and the refusal when no GPU is present
(tests/engines/test_tensorrt.py). The build and run path needs a CUDA GPU: its test is marked
`gpu` and skips elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.artifacts.onnx import INPUTS, artifact_name, require_gate
from fewstep.engines.backends.plans import load_plan, store_plan
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import read_verified
from fewstep.models.pipelines import LatentNets
from fewstep.models.unet import Denoiser
from fewstep.models.video_cache import VideoConfig, VideoNet

ARTIFACT_FOR = {"fp16": "fp32", "fp32": "fp32", "int8": "int8", "fp8": "fp8"}


@dataclass(frozen=True)
class ShapeProfile:
    """A TensorRT optimisation profile over the batch axis (min ≤ opt ≤ max)."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def holds(self, batch: int) -> bool:
        return self.min_batch <= batch <= self.max_batch


DEFAULT_PROFILES = (ShapeProfile(1, 1, 1), ShapeProfile(2, 8, 16), ShapeProfile(17, 32, 64))


def select_profile(batch: int, profiles: tuple[ShapeProfile, ...] = DEFAULT_PROFILES) -> int:
    """Index of the narrowest profile that holds `batch`; ValueError when none does (split the batch)."""
    fits = [i for i, p in enumerate(profiles) if p.holds(batch)]
    if not fits:
        raise ValueError(f"batch {batch} exceeds every profile (max {max(p.max_batch for p in profiles)})")
    return min(fits, key=lambda i: profiles[i].max_batch - profiles[i].min_batch)


def cache_key(
    artifact_sha256: str,
    gpu: str,
    trt_version: str,
    precision: str,
    profiles: tuple[ShapeProfile, ...] = DEFAULT_PROFILES,
) -> str:
    """Engine cache key: everything that makes a built engine invalid when it changes."""
    blob = json.dumps(
        {
            "artifact": artifact_sha256,
            "gpu": gpu,
            "tensorrt": trt_version,
            "precision": precision,
            "profiles": [p.__dict__ for p in profiles],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def split_batches(batch: int, profiles: tuple[ShapeProfile, ...] = DEFAULT_PROFILES) -> list[tuple[int, int]]:
    """(start, stop) slices of a batch such that each fits a profile."""
    cap = max(p.max_batch for p in profiles)
    return [(i, min(i + cap, batch)) for i in range(0, batch, cap)]


@dataclass
class TensorRTBackend:
    cache: Path = Path("var/trt-cache")
    """Where built plans are kept (the `trt_cache` setting)."""
    precisions: tuple[str, ...] = tuple(ARTIFACT_FOR)

    def video(self, folder: Path, manifest: dict[str, Any], cfg: VideoConfig) -> VideoNet:
        raise CheckpointError("the tensorrt backend serves image models; video runs on torch or onnxruntime")

    def latent(self, folder: Path, manifest: dict[str, Any], precision: str, device: str, dtype: str) -> LatentNets:
        raise CheckpointError("the tensorrt backend does not serve imported pipelines yet; use onnxruntime")

    def image(self, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        if precision not in ARTIFACT_FOR:
            raise CheckpointError(f"tensorrt backend serves {tuple(ARTIFACT_FOR)}, not {precision!r}")
        try:
            import tensorrt as trt
        except ImportError as e:
            raise CheckpointError("tensorrt backend needs the `tensorrt` package (pip install 'fewstep[gpu]')") from e
        if not torch.cuda.is_available():
            raise CheckpointError("tensorrt backend needs a CUDA GPU; none is visible")
        source = ARTIFACT_FOR[precision]
        art = require_gate(folder, source)
        onnx_path = folder / artifact_name(source)
        gpu = torch.cuda.get_device_name(0)
        key = cache_key(art["sha256"], gpu, trt.__version__, precision)
        cache = self.cache
        plan = load_plan(cache, key)  # verified against its manifest, else None
        if plan is None:
            graph = read_verified(onnx_path, art.get("sha256"), f"{folder.name}: {onnx_path.name}")
            plan = _build(trt, graph, onnx_path.name, precision, art)
            built_from = {"artifact": onnx_path.name, "sha256": art["sha256"], "precision": precision}
            store_plan(cache, key, plan, {**built_from, "gpu": gpu, "tensorrt": trt.__version__})
        return _runner(trt, plan)


def _build(trt: Any, graph: bytes, name: str, precision: str, art: dict[str, Any]) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {name}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp8":
        config.set_flag(trt.BuilderFlag.FP8)
        config.set_flag(trt.BuilderFlag.FP16)
    for prof in DEFAULT_PROFILES:
        p = builder.create_optimization_profile()
        for name in INPUTS:
            tail = [d for d in art["inputs"][name]["shape"][1:]]
            p.set_shape(name, [prof.min_batch, *tail], [prof.opt_batch, *tail], [prof.max_batch, *tail])
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f"TensorRT failed to build an engine from {name}")
    return bytes(serialized)


def _runner(trt: Any, plan: bytes) -> Denoiser:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    contexts = [engine.create_execution_context() for _ in DEFAULT_PROFILES]
    stream = torch.cuda.Stream()
    for i, ctx in enumerate(contexts):
        ctx.set_optimization_profile_async(i, stream.cuda_stream)

    def run_slice(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx = contexts[select_profile(x.shape[0])]
        feeds = {"x": x, "t": t, "states": states, "mask": mask}
        dev = {k: v.to("cuda", torch.float32).contiguous() for k, v in feeds.items()}
        out = torch.empty_like(dev["x"])
        for name, tensor in dev.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        ctx.set_tensor_address("v", out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu()

    def net(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([run_slice(x[a:b], t[a:b], states[a:b], mask[a:b]) for a, b in split_batches(len(x))])

    return net
