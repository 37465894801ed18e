"""A video student's ONNX artifacts: three graphs with the KV cache as inputs and outputs, opened verified.

* `video.text.onnx`: `states`, `mask` → `text_k`, `text_v`, `text_pooled` (once per prompt);
* `video.denoise.onnx`: `x`, `t`, the prompt's keys/values and mask, the cache (`cache_k`,
  `cache_v`, `frame_of`, `written`, and the latest clean frames `cache_frames`) → `v` (one per step);
* `video.keys_values.onnx`: the clean frame with the same prompt and cache inputs → the frame's
  `k`, `v` in every layer (one per frame), which the engine stores in the cache's next slot.

`video.onnx.json` records each graph's sha256, the source weights' sha256, tool versions and parity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import WEIGHTS, read_manifest, read_verified
from fewstep.models.video_cache import KVCache, TextKV, VideoConfig

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


def graph_file(name: str) -> str:
    return f"video.{name}.onnx"


class GraphVideoNet:
    """`VideoNet` on exported graphs: the three graphs behind the same three methods."""

    def __init__(
        self,
        folder: Path,
        cfg: VideoConfig,
        threads: int | None = None,
        graphs: dict[str, bytes] | None = None,
        sessions: dict[str, Any] | None = None,
    ) -> None:
        """ONNX Runtime sessions of the graphs of `folder`, or of their bytes as `graphs` (already read and
        hash-checked); or `sessions` already made (OpenVINO's, `artifacts/openvino.py`)."""
        self.cfg = cfg
        if sessions is not None:
            self.sessions = sessions
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the process's one thread budget
        options.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(
                graphs[name] if graphs is not None else str(folder / graph_file(name)),
                options,
                providers=["CPUExecutionProvider"],
            )
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


def read_artifact(folder: Path) -> dict[str, Any]:
    """`video.onnx.json` of `folder`, when it names the folder's own weights as its source; CheckpointError
    otherwise."""
    path = folder / ARTIFACT
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: no video ONNX artifact; run `fewstep export`")
    art = dict(json.loads(path.read_text()))
    weights = read_manifest(folder)["files"][WEIGHTS]["sha256"]
    if art.get("source", {}).get("sha256") != weights:
        raise CheckpointError(f"{folder.name}: the ONNX graphs were exported from other weights")
    return art


def load_video_graphs(folder: Path, cfg: VideoConfig) -> GraphVideoNet:
    """The exported graphs of `folder`, each hash-checked against `video.onnx.json` (`read_artifact`)."""
    art = read_artifact(folder)
    graphs = {}
    for name in GRAPHS:
        entry = art["graphs"][name]
        # read once and hashed: the session is built from exactly these bytes
        graphs[name] = read_verified(folder / entry["file"], entry["sha256"], f"{folder.name}: {entry['file']}")
    return GraphVideoNet(folder, cfg, graphs=graphs)
