"""An image denoiser's ONNX artifacts: names, the graph's contract, artifact manifests, verified sessions.

`model.<precision>.onnx` sits beside the checkpoint's weights with `model.<precision>.onnx.json`:
opset, I/O names, shapes and dtypes, the sha256 of the ONNX file and of the weights it was exported
from, tool versions, parity and (quantized ones) the quality gate. The graph is the whole `Denoiser`:
inputs `x` (B, C, H, W), `t` (B,) in [0, 1], `states` (B, L, D) and `mask` (B, L); output `v`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import WEIGHTS, read_verified
from fewstep.models.unet import Denoiser

INPUTS = ("x", "t", "states", "mask")
OUTPUTS = ("v",)
QUANTIZED = ("int8", "int8-dynamic", "fp8")
"""Quantized precisions, each an artifact derived from the fp32 graph."""


def artifact_name(precision: str) -> str:
    return f"model.{precision}.onnx"


def describe(folder: Path, precision: str = "fp32") -> dict[str, Any]:
    """The artifact manifest of `folder` for `precision` (CheckpointError when absent)."""
    path = folder / (artifact_name(precision) + ".json")
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: no {precision} ONNX artifact; run `fewstep export`")
    return dict(json.loads(path.read_text()))


def require_gate(folder: Path, precision: str) -> dict[str, Any]:
    """The artifact manifest, if its quality gate passed; CheckpointError otherwise."""
    art = describe(folder, precision)
    if precision != "fp32" and not art.get("gate", {}).get("passed"):
        raise CheckpointError(f"{folder.name}: {precision} artifact failed its quality gate ({art.get('gate')})")
    return art


def verified_artifact(folder: Path, manifest: dict[str, Any], precision: str) -> tuple[bytes, dict[str, Any]]:
    """The graph (its bytes, read once and hashed) and manifest of a `precision` artifact that may be
    served: its gate passed, the bytes match its sha256, and it was exported from this checkpoint's own
    weights. CheckpointError otherwise."""
    art = require_gate(folder, precision)
    path = folder / artifact_name(precision)
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{folder.name}: {path.name} is missing")
    if art.get("source", {}).get("sha256") != manifest["files"][WEIGHTS]["sha256"]:
        raise CheckpointError(f"{folder.name}: {path.name} was exported from other weights than this checkpoint's")
    return read_verified(path, art.get("sha256"), f"{folder.name}: {path.name}"), art


# Fastest first. TensorRT's provider builds an engine per shape profile (slow first call);
# CUDA is the general GPU path; the CPU provider is always present.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: Sequence[str], allow_tensorrt: bool = True) -> list[str]:
    """The providers to request, in preference order, from those this onnxruntime build has."""
    chosen = [p for p in PROVIDER_PREFERENCE if p in available and (allow_tensorrt or "Tensorrt" not in p)]
    return chosen or ["CPUExecutionProvider"]


def denoiser_feeds(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """A denoiser graph's inputs by name, as float32 arrays."""
    named = {"x": x, "t": t, "states": states, "mask": mask}
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in named.items()}


def session_denoiser(
    graph: Path | bytes, providers: Sequence[str] | None = None, threads: int | None = None
) -> Denoiser:
    """A `Denoiser` that runs an ONNX graph, a file or its bytes (inputs x, t, states, mask → v)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same thread budget as torch in this process: oversubscription on a small CPU is catastrophic.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    chosen = list(providers) if providers is not None else choose_providers(ort.get_available_providers())
    session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options, providers=chosen)

    def net(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["v"], denoiser_feeds(x, t, states, mask))[0])

    net.session = session  # type: ignore[attr-defined]
    return net
