"""The torch eager backend: the reference every other backend is checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.unet import Denoiser, as_denoiser, build_unet


class TorchBackend:
    """Loads a UNet checkpoint folder into a torch `Denoiser` (fp32 on CPU)."""

    PRECISIONS = ("fp32",)

    @staticmethod
    def load(folder: Path, manifest: dict[str, Any], precision: str) -> Denoiser:
        if precision not in TorchBackend.PRECISIONS:
            raise CheckpointError(f"torch backend serves {TorchBackend.PRECISIONS}, not {precision!r}")
        verified, state = load_checkpoint(folder)
        arch = verified.get("architecture", {})
        if arch.get("class") != "UNet2DConditionModel":
            raise CheckpointError(f"{folder}: architecture {arch.get('class')!r} is not a UNet2DConditionModel")
        try:
            unet = build_unet(arch["config"])
            unet.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{folder}: weights do not fit the manifest's architecture ({e})") from e
        for p in unet.parameters():
            p.requires_grad_(False)
        scale = float(verified.get("schedule", {}).get("timestep_scale", 1000.0))
        return as_denoiser(unet.eval(), scale)
