"""The reference image denoiser: a small text-conditioned diffusers UNet2DConditionModel.

Full-resolution self-attention at 32×32 makes this UNet ~4× slower to train on a CPU
(research/stack-notes.md), so the 32×32 level is convolution only and cross-attention to
the prompt happens at 16×16 and 8×8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from fewstep.errors import CheckpointError
from fewstep.models import lazy
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.text import ENCODER_DIM


def image_unet_config(sample_size: int = 32, width: int = 32) -> dict[str, Any]:
    """The diffusers config of the reference image UNet (saved verbatim in manifests)."""
    return {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [width, width * 2, width * 2],
        "layers_per_block": 1,
        "cross_attention_dim": ENCODER_DIM,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": ENCODER_DIM,
    }


def build_unet(config: dict[str, Any]) -> torch.nn.Module:
    """A UNet from a manifest config, in eval mode."""
    unet_class = lazy.attr("diffusers", "UNet2DConditionModel")  # not at import: see `lazy`
    return cast(torch.nn.Module, unet_class(**config)).eval()


def load_unet(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """Manifest and UNet of a verified checkpoint folder (hashes, safetensors only, strict shapes), in eval
    mode with gradients off; CheckpointError when the weights do not fit the manifest's architecture."""
    manifest, state = load_checkpoint(folder)
    arch = manifest.get("architecture", {})
    if arch.get("class") != "UNet2DConditionModel":
        raise CheckpointError(f"{folder}: architecture {arch.get('class')!r} is not a UNet2DConditionModel")
    try:
        unet = build_unet(arch["config"])
        unet.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: weights do not fit the manifest's architecture ({e})") from e
    for p in unet.parameters():
        p.requires_grad_(False)
    return manifest, unet.eval()


def denoise(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    timestep_scale: float = 1000.0,
) -> torch.Tensor:
    """One network evaluation: flow prediction for states `x` at per-item times `t` (shape (B,))."""
    pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return unet(
        x,
        t * timestep_scale,
        encoder_hidden_states=states,
        encoder_attention_mask=mask,
        class_labels=pooled,
        return_dict=False,
    )[0]


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x, t in [0, 1] per item, token states, mask) → flow prediction: what every backend provides."""


def as_denoiser(unet: torch.nn.Module, timestep_scale: float = 1000.0) -> Denoiser:
    """Wrap a torch UNet as a `Denoiser`."""

    def net(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return denoise(unet, x, t, states, mask, timestep_scale)

    return net
