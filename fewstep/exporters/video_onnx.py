"""Export a video student to ONNX (three graphs with the KV cache as inputs and outputs), check parity.

The per-frame work is three graphs, each a method of `VideoDenoiser` with tensors in and out
(`artifacts.video` names them and their inputs and outputs). The cache keeps its static shape
(layers, batch, heads, sink + window, tokens, head_dim), so one graph serves every frame of every
stream; the batch axis is dynamic. `video.onnx.json` records
each graph's sha256, the source weights' sha256, tool versions and the parity figures: whole
streams made by torch and by ONNX Runtime through the same engine code (past the window's
roll-over), compared frame by frame; the export fails below `MIN_PSNR_DB`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fewstep.artifacts.video import ARTIFACT, BATCH_AXIS, GRAPHS, INPUTS, OUTPUTS, GraphVideoNet, graph_file
from fewstep.errors import CheckpointError
from fewstep.evaluation.metrics import psnr
from fewstep.exporters.onnx import provenance, psnr_parity
from fewstep.models.checkpoint import load_checkpoint, sha256_file, write_json_atomic
from fewstep.models.sampling import frame_noise, student_stream, to_uint8
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser
from fewstep.models.video_cache import KVCache, TextKV, VideoConfig, VideoNet

PARITY_PROMPTS = ("a red circle moving left quickly", "a blue square sliding up slowly")


def _text(mask: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooled: torch.Tensor) -> TextKV:
    return TextKV(k, v, mask > 0.5, pooled)


class _TextGraph(torch.nn.Module):
    def __init__(self, net: VideoDenoiser) -> None:
        super().__init__()
        self.net = net

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv = self.net.text_kv(states, mask)
        return kv.k, kv.v, kv.pooled


class _DenoiseGraph(torch.nn.Module):
    def __init__(self, net: VideoDenoiser) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        frame_of: torch.Tensor,
        written: torch.Tensor,
        cache_frames: torch.Tensor,
    ) -> torch.Tensor:
        cache = KVCache(cache_k, cache_v, frame_of, written, cache_frames)
        return self.net.denoise(x, t, _text(text_mask, text_k, text_v, text_pooled), cache)


class _KeysValuesGraph(torch.nn.Module):
    def __init__(self, net: VideoDenoiser) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        clean: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        frame_of: torch.Tensor,
        written: torch.Tensor,
        cache_frames: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(cache_k, cache_v, frame_of, written, cache_frames)
        return self.net.keys_values(clean, _text(text_mask, text_k, text_v, text_pooled), cache)


def _examples(net: VideoDenoiser, encoder: TextEncoder) -> dict[str, tuple[torch.Tensor, ...]]:
    cfg = net.cfg
    states, mask = encoder.encode(list(PARITY_PROMPTS))
    text = net.text_kv(states, mask)
    cache = KVCache.empty(cfg, 2)
    x = torch.randn(2, cfg.channels, cfg.size, cfg.size)
    rest = (text.k, text.v, mask.float(), text.pooled, cache.k, cache.v, cache.frame_of, cache.written, cache.frames)
    return {"text": (states, mask.float()), "denoise": (x, torch.rand(2), *rest), "keys_values": (x, *rest)}


def export_video_onnx(folder: Path, encoder: TextEncoder) -> dict[str, Any]:
    """Write the three graphs and `video.onnx.json` into the version folder; CheckpointError on a parity
    failure (nothing is left behind then)."""
    manifest, state = load_checkpoint(folder)
    if manifest.get("kind") != "video":
        raise CheckpointError(f"{folder.name}: kind {manifest.get('kind')!r} is not a video student")
    cfg = VideoConfig(**manifest["architecture"]["config"])
    net = VideoDenoiser(cfg)
    net.load_state_dict(state)
    net.eval()
    modules = {"text": _TextGraph(net), "denoise": _DenoiseGraph(net), "keys_values": _KeysValuesGraph(net)}
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        examples = _examples(net, encoder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for name in GRAPHS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    modules[name],
                    examples[name],
                    str(Path(tmp) / graph_file(name)),
                    dynamo=True,
                    input_names=list(INPUTS[name]),
                    output_names=list(OUTPUTS[name]),
                    dynamic_shapes={i: {BATCH_AXIS.get(i, 0): batch} for i in INPUTS[name]},
                    external_data=False,
                    verbose=False,
                )
        parity = video_parity(manifest, net, GraphVideoNet(Path(tmp), cfg), encoder)
        for name in GRAPHS:
            os.replace(Path(tmp) / graph_file(name), folder / graph_file(name))
    art = {
        "format": 1,
        "graphs": {
            name: {
                "file": graph_file(name),
                "inputs": list(INPUTS[name]),
                "outputs": list(OUTPUTS[name]),
                "sha256": sha256_file(folder / graph_file(name)),
                "bytes": (folder / graph_file(name)).stat().st_size,
            }
            for name in GRAPHS
        },
        "cache_shape": ["layers", "batch", "heads", "sink + window", "tokens", "head_dim"],
        **provenance(manifest),
        "parity": parity,
    }
    write_json_atomic(folder / ARTIFACT, art)
    return art


def video_parity(
    manifest: dict[str, Any], ref: VideoDenoiser, net: VideoNet, encoder: TextEncoder, what: str = "video ONNX"
) -> dict[str, Any]:
    schedule = FewStepSchedule.from_dict(manifest["schedule"])
    cfg = ref.cfg
    frames = cfg.sink + cfg.window + 3  # past the window's roll-over
    seeds = [11, 12]
    states, mask = encoder.encode(list(PARITY_PROMPTS))

    def noise(f: int, k: int) -> torch.Tensor:
        return frame_noise(seeds, f, k, cfg)

    figures: dict[str, float] = {}
    for steps in schedule.steps:
        a = student_stream(ref, ref.text_kv(states, mask), schedule, steps, frames, noise)
        b = student_stream(net, net.text_kv(states, mask), schedule, steps, frames, noise)
        figures[str(steps)] = psnr(to_uint8(a).numpy(), to_uint8(b).numpy())
    return psnr_parity(figures, what, streams=len(seeds), frames=frames)
