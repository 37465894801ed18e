"""The ONNX Runtime backend: CPU here; CUDA and TensorRT execution providers where present.

An artifact is refused at load (CheckpointError, so the previous version keeps serving) when
its manifest is missing, the file does not match its sha256, it was exported from other weights
than the checkpoint's, a quantized artifact failed its quality gate, or its graph's
inputs/outputs are not the Denoiser's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep.artifacts.onnx import INPUTS, OUTPUTS, QUANTIZED, artifact_name, session_denoiser, verified_artifact
from fewstep.artifacts.pipeline import GraphNets, verified_graphs
from fewstep.artifacts.video import load_video_graphs
from fewstep.errors import CheckpointError
from fewstep.models.pipelines import LatentNets
from fewstep.models.unet import Denoiser
from fewstep.models.video_cache import VideoConfig, VideoNet


class OnnxRuntimeBackend:
    precisions: tuple[str, ...] = ("fp32", *QUANTIZED)

    def image(self, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        if precision not in self.precisions:
            raise CheckpointError(f"onnxruntime backend serves {self.precisions}, not {precision!r}")
        graph, art = verified_artifact(folder, manifest, precision)
        name = artifact_name(precision)
        try:
            net = session_denoiser(graph)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise CheckpointError(f"{folder.name}: ONNX Runtime cannot load {name} ({type(e).__name__})") from e
        session = net.session  # type: ignore[attr-defined]
        names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
        if names != (INPUTS, OUTPUTS):
            raise CheckpointError(f"{folder.name}: {name} has inputs/outputs {names}, expected {(INPUTS, OUTPUTS)}")
        if not art.get("batch_invariant", True):
            return _item_by_item(net)
        return net

    def video(self, folder: Path, manifest: dict[str, Any], cfg: VideoConfig) -> VideoNet:
        return load_video_graphs(folder, cfg)

    def latent(self, folder: Path, manifest: dict[str, Any], precision: str, device: str, dtype: str) -> LatentNets:
        # The graphs are fp32; ONNX Runtime picks the device from its execution providers.
        if dtype != "float32":
            raise CheckpointError(f"onnxruntime serves the pipeline's fp32 graphs (or quantized ones), not {dtype}")
        paths, art = verified_graphs(folder, manifest, precision)
        return GraphNets(paths, art)


def _item_by_item(net: Denoiser) -> Denoiser:
    """Run a batch-dependent graph one item at a time, so that batching never changes an image."""

    def per_item(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i : i + 1], t[i : i + 1], states[i : i + 1], mask[i : i + 1]) for i in range(len(x))])

    per_item.session = net.session  # type: ignore[attr-defined]
    return per_item
