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

from fewstep.errors import CheckpointError
from fewstep.exporters.onnx import INPUTS, OUTPUTS, artifact_name
from fewstep.exporters.ort import session_denoiser
from fewstep.exporters.quantize import QUANTIZED, require_gate
from fewstep.models.checkpoint import sha256_file
from fewstep.models.unet import Denoiser


class OnnxRuntimeBackend:
    PRECISIONS = ("fp32", *QUANTIZED)

    @staticmethod
    def load(folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        if precision not in OnnxRuntimeBackend.PRECISIONS:
            raise CheckpointError(f"onnxruntime backend serves {OnnxRuntimeBackend.PRECISIONS}, not {precision!r}")
        art = require_gate(folder, precision)
        path = folder / artifact_name(precision)
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{folder.name}: {path.name} is missing")
        if sha256_file(path) != art.get("sha256"):
            raise CheckpointError(f"{folder.name}: {path.name} does not match the sha256 in its manifest")
        source = manifest["files"]["model.safetensors"]["sha256"]
        if art.get("source", {}).get("sha256") != source:
            raise CheckpointError(f"{folder.name}: {path.name} was exported from other weights than this checkpoint's")
        try:
            net = session_denoiser(path)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise CheckpointError(f"{folder.name}: ONNX Runtime cannot load {path.name} ({type(e).__name__})") from e
        session = net.session  # type: ignore[attr-defined]
        names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
        if names != (INPUTS, OUTPUTS):
            raise CheckpointError(
                f"{folder.name}: {path.name} has inputs/outputs {names}, expected {(INPUTS, OUTPUTS)}"
            )
        if not art.get("batch_invariant", True):
            return _item_by_item(net)
        return net


def _item_by_item(net: Denoiser) -> Denoiser:
    """Run a batch-dependent graph one item at a time, so that batching never changes an image."""

    def per_item(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i : i + 1], t[i : i + 1], states[i : i + 1], mask[i : i + 1]) for i in range(len(x))])

    per_item.session = net.session  # type: ignore[attr-defined]
    return per_item
