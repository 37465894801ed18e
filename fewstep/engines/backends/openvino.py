"""The OpenVINO backend (CPU): a version's OpenVINO IR artifacts (`fewstep export --openvino`), FP32 or INT8.

Every graph is compiled from the bytes its manifest hashed (`artifacts/openvino.py`). An artifact is refused at
load (CheckpointError: the previous version keeps serving) when it is missing, a file does not match its
sha256, it was made from other weights than the version's, its INT8 gate failed, or its ports are not the
ones its manifest names. Video students run their FP32 graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.artifacts.onnx import INPUTS, OUTPUTS
from fewstep.artifacts.openvino import PRECISIONS, OvGraph, ov_denoiser, verified_graphs
from fewstep.artifacts.pipeline import GraphNets, source_digest
from fewstep.artifacts.video import GraphVideoNet
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import WEIGHTS
from fewstep.models.pipelines import LatentNets
from fewstep.models.unet import Denoiser
from fewstep.models.video_cache import VideoConfig, VideoNet


def _needs_openvino() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        raise CheckpointError(
            "the openvino backend needs the `openvino` package (pip install 'fewstep[openvino]')"
        ) from e


class OpenVinoBackend:
    precisions: tuple[str, ...] = PRECISIONS

    def image(self, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        _needs_openvino()
        graphs, _ = verified_graphs(folder, str(manifest.get("kind")), manifest["files"][WEIGHTS]["sha256"], precision)
        ir = graphs["denoiser"]
        if (tuple(ir.inputs), tuple(ir.outputs)) != (INPUTS, OUTPUTS):
            raise CheckpointError(f"{folder.name}: the OpenVINO denoiser has ports {ir.inputs} → {ir.outputs}")
        return ov_denoiser(OvGraph(ir, ir.inputs, ir.outputs))

    def video(self, folder: Path, manifest: dict[str, Any], cfg: VideoConfig) -> VideoNet:
        _needs_openvino()
        graphs, _ = verified_graphs(folder, "video", manifest["files"][WEIGHTS]["sha256"], "fp32")
        return GraphVideoNet(folder, cfg, sessions={r: OvGraph(ir, ir.inputs, ir.outputs) for r, ir in graphs.items()})

    def latent(self, folder: Path, manifest: dict[str, Any], precision: str, device: str, dtype: str) -> LatentNets:
        if device != "cpu" or dtype != "float32":
            raise CheckpointError(f"openvino serves pipelines on the CPU in float32 graphs, not {device}/{dtype}")
        _needs_openvino()
        graphs, art = verified_graphs(folder, str(manifest.get("kind")), source_digest(manifest), precision)
        return GraphNets({}, art, sessions={r: OvGraph(ir, ir.inputs, ir.outputs) for r, ir in graphs.items()})
