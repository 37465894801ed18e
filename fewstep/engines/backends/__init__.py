"""Backends turn a verified registry version into something that runs: a `Denoiser` for an image model,
a `VideoNet` for a video model, `LatentNets` for an imported diffusers pipeline. One table, by name, for
every model kind (`BACKENDS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from fewstep.engines.backends.onnxruntime import OnnxRuntimeBackend
from fewstep.engines.backends.openvino import OpenVinoBackend
from fewstep.engines.backends.tensorrt import TensorRTBackend
from fewstep.engines.backends.torch import TorchBackend
from fewstep.errors import CheckpointError
from fewstep.models.pipelines import LatentNets
from fewstep.models.unet import Denoiser
from fewstep.models.video_cache import VideoConfig, VideoNet


class Backend(Protocol):
    """What a backend offers. Each method raises `CheckpointError` when it cannot serve the folder (a
    missing or unverified artifact, a precision it lacks, no GPU): the version is then refused."""

    precisions: tuple[str, ...]

    def image(self, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser: ...

    def video(self, folder: Path, manifest: dict[str, Any], cfg: VideoConfig) -> VideoNet: ...

    def latent(self, folder: Path, manifest: dict[str, Any], precision: str, device: str, dtype: str) -> LatentNets: ...


BACKENDS: dict[str, Backend] = {
    "torch": TorchBackend(),
    "onnxruntime": OnnxRuntimeBackend(),
    "openvino": OpenVinoBackend(),
    "tensorrt": TensorRTBackend(),
}


def backend(name: str, trt_cache: Path | None = None) -> Backend:
    """The backend called `name`; CheckpointError naming the known ones otherwise. `trt_cache`: where the
    tensorrt backend keeps its built plans (the `trt_cache` setting; its default otherwise)."""
    if name not in BACKENDS:
        raise CheckpointError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    if name == "tensorrt" and trt_cache is not None:
        return TensorRTBackend(cache=trt_cache)
    return BACKENDS[name]
