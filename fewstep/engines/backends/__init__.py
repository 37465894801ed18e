"""Backends turn an artifact folder into a `Denoiser` callable. Picked by name from `BACKENDS`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep.engines.backends.onnxruntime import OnnxRuntimeBackend
from fewstep.engines.backends.tensorrt import TensorRTBackend
from fewstep.engines.backends.torch import TorchBackend
from fewstep.errors import InvalidRequest
from fewstep.models.unet import Denoiser

BackendFactory = Callable[[Path, dict[str, Any], str], Denoiser]

BACKENDS: dict[str, BackendFactory] = {
    "torch": TorchBackend.load,
    "onnxruntime": OnnxRuntimeBackend.load,
    "tensorrt": TensorRTBackend.load,
}


def load_backend(name: str, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
    """The denoiser of `folder` on backend `name`."""
    if name not in BACKENDS:
        raise InvalidRequest("backend", f"`backend` must be one of {sorted(BACKENDS)}. Given: {name!r}")
    return BACKENDS[name](folder, manifest, precision)
