"""ONNX Runtime sessions as `Denoiser`s, and the execution-provider preference order.

Lives with the exporters because the exporter's parity check runs the graph it just wrote;
the engines' `onnxruntime` backend builds on it after verifying the artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fewstep.models.unet import Denoiser

# Fastest first. TensorRT's provider builds an engine per shape profile (slow first call);
# CUDA is the general GPU path; the CPU provider is always present.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: Sequence[str], allow_tensorrt: bool = True) -> list[str]:
    """The providers to request, in preference order, from those this onnxruntime build has."""
    chosen = [p for p in PROVIDER_PREFERENCE if p in available and (allow_tensorrt or "Tensorrt" not in p)]
    return chosen or ["CPUExecutionProvider"]


def session_denoiser(path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Denoiser:
    """A `Denoiser` that runs the ONNX graph at `path` (inputs x, t, states, mask → v)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same thread budget as torch in this process: oversubscription on a small CPU is catastrophic.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    chosen = list(providers) if providers is not None else choose_providers(ort.get_available_providers())
    session = ort.InferenceSession(str(path), options, providers=chosen)

    def net(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            "x": x.detach().cpu().numpy().astype(np.float32, copy=False),
            "t": t.detach().cpu().numpy().astype(np.float32, copy=False),
            "states": states.detach().cpu().numpy().astype(np.float32, copy=False),
            "mask": mask.detach().cpu().numpy().astype(np.float32, copy=False),
        }
        return torch.from_numpy(session.run(["v"], feeds)[0])

    net.session = session  # type: ignore[attr-defined]
    return net
