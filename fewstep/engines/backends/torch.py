"""The torch eager backend: the reference every other backend is checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.errors import CheckpointError
from fewstep.models.pipelines import LatentNets, TorchNets, dtype_of
from fewstep.models.unet import Denoiser, as_denoiser, load_unet
from fewstep.models.video import load_video_net
from fewstep.models.video_cache import VideoConfig, VideoNet


def set_intra_op_threads(n: int) -> None:
    """The calling thread's intra-op threads (its OpenMP team), for good. torch sets up a thread's team lazily,
    at the thread's first parallel op, from the process-wide count that the last `set_num_threads` in *any*
    thread left; asking for the count first makes that happen now, so that it cannot override `n` later (it
    did: an interactive-only worker set for one thread ran with two once another thread had set two, and the
    extra OpenMP threads past the cores made libgomp throttle every team's spin-waits: 0.6× throughput)."""
    import torch

    torch.get_num_threads()
    torch.set_num_threads(n)


class TorchBackend:
    """Loads checkpoint folders into torch modules (fp32 on CPU)."""

    precisions: tuple[str, ...] = ("fp32",)

    def image(self, folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        if precision not in self.precisions:
            raise CheckpointError(f"torch backend serves {self.precisions}, not {precision!r}")
        verified, unet = load_unet(folder)
        scale = float(verified.get("schedule", {}).get("timestep_scale", 1000.0))
        return as_denoiser(unet, scale)

    def video(self, folder: Path, manifest: dict[str, Any], cfg: VideoConfig) -> VideoNet:
        return load_video_net(folder)

    def latent(self, folder: Path, manifest: dict[str, Any], precision: str, device: str, dtype: str) -> LatentNets:
        if precision not in self.precisions:
            raise CheckpointError(f"torch backend serves {self.precisions}, not {precision!r}")
        return TorchNets(folder, manifest, device, dtype_of(dtype))
