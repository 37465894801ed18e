"""Export a video student to ONNX (three graphs with the KV cache as inputs and outputs), check parity.

The per-frame work is three graphs, each a method of `VideoDenoiser` with tensors in and out:

* `video.text.onnx`: `states`, `mask` → `text_k`, `text_v`, `text_pooled` (once per prompt);
* `video.denoise.onnx`: `x`, `t`, the prompt's keys/values and mask, the cache (`cache_k`,
  `cache_v`, `frame_of`, `written`, and the latest clean frames `cache_frames`) → `v` (one per step);
* `video.keys_values.onnx`: the clean frame with the same prompt and cache inputs → the frame's
  `k`, `v` in every layer (one per frame), which the engine stores in the cache's next slot.

The cache keeps its static shape (layers, batch, heads, sink + window, tokens, head_dim), so one
graph serves every frame of every stream; the batch axis is dynamic. `video.onnx.json` records
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

import numpy as np
import torch

from fewstep.errors import CheckpointError
from fewstep.exporters.onnx import provenance, psnr, psnr_parity
from fewstep.models.checkpoint import load_checkpoint, sha256_file, write_json_atomic
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache, TextKV, VideoConfig, VideoDenoiser, frame_noise, student_stream

ARTIFACT = "video.onnx.json"
GRAPHS = ("text", "denoise", "keys_values")
CACHE_INPUTS = (
    "text_k",
    "text_v",
    "text_mask",
    "text_pooled",
    "cache_k",
    "cache_v",
    "frame_of",
    "written",
    "cache_frames",
)
INPUTS: dict[str, tuple[str, ...]] = {
    "text": ("states", "mask"),
    "denoise": ("x", "t", *CACHE_INPUTS),
    "keys_values": ("clean", *CACHE_INPUTS),
}
OUTPUTS: dict[str, tuple[str, ...]] = {
    "text": ("text_k", "text_v", "text_pooled"),
    "denoise": ("v",),
    "keys_values": ("k", "v"),
}
BATCH_AXIS = {"text_k": 1, "text_v": 1, "cache_k": 1, "cache_v": 1}
PARITY_PROMPTS = ("a red circle moving left quickly", "a blue square sliding up slowly")


def graph_file(name: str) -> str:
    return f"video.{name}.onnx"


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


class OnnxVideoNet:
    """`VideoNet` on ONNX Runtime: the three exported graphs behind the same three methods."""

    def __init__(self, folder: Path, cfg: VideoConfig, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the process's one thread budget
        options.inter_op_num_threads = 1
        self.cfg = cfg
        self.sessions = {
            name: ort.InferenceSession(str(folder / graph_file(name)), options, providers=["CPUExecutionProvider"])
            for name in GRAPHS
        }

    def _run(self, graph: str, **feeds: torch.Tensor) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(a) for a in self.sessions[graph].run(list(OUTPUTS[graph]), arrays)]

    @staticmethod
    def _cache_feeds(text: TextKV, cache: KVCache) -> dict[str, torch.Tensor]:
        return {
            "text_k": text.k,
            "text_v": text.v,
            "text_mask": text.mask.float(),
            "text_pooled": text.pooled,
            "cache_k": cache.k,
            "cache_v": cache.v,
            "frame_of": cache.frame_of,
            "written": cache.written,
            "cache_frames": cache.frames,
        }

    def text_kv(self, states: torch.Tensor, mask: torch.Tensor) -> TextKV:
        k, v, pooled = self._run("text", states=states.float(), mask=mask.float())
        return TextKV(k, v, mask.bool(), pooled)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: TextKV, cache: KVCache) -> torch.Tensor:
        return self._run("denoise", x=x.float(), t=t.float(), **self._cache_feeds(text, cache))[0]

    def keys_values(self, clean: torch.Tensor, text: TextKV, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._run("keys_values", clean=clean.float(), **self._cache_feeds(text, cache))
        return k, v


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
        parity = _parity(manifest, net, OnnxVideoNet(Path(tmp), cfg), encoder)
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


def _parity(manifest: dict[str, Any], ref: VideoDenoiser, net: OnnxVideoNet, encoder: TextEncoder) -> dict[str, Any]:
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
        figures[str(steps)] = psnr(_u8(a), _u8(b))
    return psnr_parity(figures, "video ONNX", streams=len(seeds), frames=frames)


def _u8(frames: torch.Tensor) -> np.ndarray:
    return ((frames + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def load_video_graphs(folder: Path, cfg: VideoConfig) -> OnnxVideoNet:
    """The exported graphs of `folder`, each hash-checked against `video.onnx.json`, which must name the
    folder's own weights as its source."""
    import json

    from fewstep.models.checkpoint import read_manifest

    path = folder / ARTIFACT
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: no video ONNX artifact; run `fewstep export`")
    art = json.loads(path.read_text())
    weights = read_manifest(folder)["files"]["model.safetensors"]["sha256"]
    if art.get("source", {}).get("sha256") != weights:
        raise CheckpointError(f"{folder.name}: the ONNX graphs were exported from other weights")
    for name in GRAPHS:
        entry = art["graphs"][name]
        if sha256_file(folder / entry["file"]) != entry["sha256"]:
            raise CheckpointError(f"{folder.name}: {entry['file']} does not match its recorded sha256")
    return OnnxVideoNet(folder, cfg)
