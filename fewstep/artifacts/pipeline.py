"""An imported pipeline's ONNX artifacts: three graphs per precision, opened verified, run as `LatentNets`.

Layout inside a registry version (artifacts are additions; the version's manifest is never rewritten):

    onnx/fp32/manifest.json     what the graphs are, their sha256, parity, the source they came from
    onnx/fp32/text.onnx         ids_0 [, ids_1 …] [, mask_i …] → states [, pooled]   (all text encoders)
    onnx/fp32/unet.onnx         sample, timestep, states [, timestep_cond] [, pooled, time_ids] → pred
    onnx/fp32/vae_decoder.onnx  latents → images in [-1, 1] (the VAE's scaling folded in)
    onnx/int8/manifest.json     a quantized UNet (`onnx/int8/unet.onnx`); text and VAE stay the fp32 graphs

The text graph takes the masks its encoders read (none but an SD encoder with `use_attention_mask`).
A graph over the protobuf limit keeps its weights in `<graph>.onnx.data` beside it, hashed like the graph.
Graph files are named relative to `onnx/` and contained there. Batch and spatial axes are dynamic: sides in
multiples of the version's `latent.size_multiple`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.artifacts.onnx import choose_providers
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import check_relative, sha256_file
from fewstep.models.pipelines import TextOut

ROOT = "onnx"
GRAPHS = ("text", "unet", "vae_decoder")
PRECISIONS = ("fp32", "int8", "int8-dynamic")
"""FP8 is TensorRT's on Hopper GPUs; the CPU emulation path cannot calibrate these graphs' varied shapes."""


def artifact_dir(folder: Path, precision: str) -> Path:
    return folder / ROOT / precision


def source_digest(manifest: dict[str, Any]) -> str:
    """One sha256 over the version's file table: an artifact names the exact weights it was exported from."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def graph_entry(root: Path, path: Path, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    """The manifest entry of a graph written at `path` under `root` (`onnx/`), with its external data if any."""
    data = path.with_name(path.name + ".data")
    return {
        "file": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "data": None
        if not data.exists()
        else {"file": data.relative_to(root).as_posix(), "sha256": sha256_file(data), "bytes": data.stat().st_size},
        "inputs": inputs,
        "outputs": outputs,
    }


def describe(folder: Path, precision: str) -> dict[str, Any]:
    """The artifact manifest of `folder` for `precision`; CheckpointError when there is none."""
    path = artifact_dir(folder, precision) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: no {precision} ONNX artifacts of this pipeline; run `fewstep export`")
    return dict(json.loads(path.read_text()))


def _contained(folder: Path, name: str) -> Path:
    """`folder/onnx/name`, refused when the name leaves `onnx/` or passes a symlink."""
    check_relative(name)
    path = folder / ROOT
    for part in name.split("/"):
        path = path / part
        if path.is_symlink():
            raise CheckpointError(f"{folder.name}: {ROOT}/{name} is a symlink (or lies in one); links are refused")
    return path


def verified_graphs(folder: Path, manifest: dict[str, Any], precision: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """Paths of the three graphs of `precision` and the artifact manifest, when they may be served: each file
    (and its external data) matches its sha256, the artifact was exported from this version's own files, and a
    quantized artifact passed its quality gate. CheckpointError otherwise."""
    if precision not in PRECISIONS:
        raise CheckpointError(f"onnxruntime serves pipelines in {PRECISIONS}, not {precision!r}")
    art = describe(folder, precision)
    if art.get("source", {}).get("sha256") != source_digest(manifest):
        raise CheckpointError(f"{folder.name}: the {precision} ONNX graphs were exported from other files")
    if precision != "fp32" and not art.get("gate", {}).get("passed"):
        raise CheckpointError(f"{folder.name}: {precision} graphs failed their quality gate ({art.get('gate')})")
    paths: dict[str, Path] = {}
    for role in GRAPHS:
        entry = art.get("graphs", {}).get(role)
        if not entry:
            raise CheckpointError(f"{folder.name}: the {precision} artifact has no {role} graph")
        for f in (entry, entry.get("data")):
            if f is None:
                continue
            path = _contained(folder, f["file"])
            if not path.is_file():
                raise CheckpointError(f"{folder.name}: {ROOT}/{f['file']} is missing")
            if sha256_file(path) != f["sha256"]:
                raise CheckpointError(f"{folder.name}: {ROOT}/{f['file']} does not match its recorded sha256")
        paths[role] = _contained(folder, entry["file"])
    return paths, art


class GraphNets:
    """`LatentNets` on exported graphs: the three graphs behind the torch networks' methods, as ONNX Runtime
    sessions of `paths`, or `sessions` already made (OpenVINO's, `artifacts/openvino.py`)."""

    def __init__(
        self,
        paths: dict[str, Path],
        art: dict[str, Any],
        threads: int | None = None,
        providers: list[str] | None = None,
        sessions: dict[str, Any] | None = None,
        arena: bool = True,
    ) -> None:
        """`arena` False: no memory arena (the exporters' checks, which run many shapes once each: an arena keeps
        the peak of every shape it met)."""
        self.sessions = sessions if sessions is not None else self._ort_sessions(paths, threads, providers, arena)
        for role, session in self.sessions.items():
            names = [i.name for i in session.get_inputs()]
            if names != art["graphs"][role]["inputs"]:
                raise CheckpointError(
                    f"the {role} graph has inputs {names}, its manifest says {art['graphs'][role]['inputs']}"
                )
        self.arch = str(art["arch"])
        self.time_cond_dim = art.get("time_cond_dim")
        self.text_inputs = art["graphs"]["text"]["inputs"]
        self.unet_inputs = art["graphs"]["unet"]["inputs"]
        # Dynamic quantization takes ranges from the whole batch: one row per call keeps images independent.
        self.per_row = not art.get("batch_invariant", True)

    @staticmethod
    def _ort_sessions(
        paths: dict[str, Path], threads: int | None, providers: list[str] | None, arena: bool = True
    ) -> dict[str, Any]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the process's one thread budget
        options.inter_op_num_threads = 1
        # Idle intra-op threads must not spin: between UNet calls the same cores tokenize, encode PNGs and
        # serve HTTP, and spinning threads take them away.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers or choose_providers(ort.get_available_providers(), allow_tensorrt=False)
        sessions = {}
        for role, path in paths.items():
            try:
                sessions[role] = ort.InferenceSession(str(path), options, providers=chosen)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise CheckpointError(f"ONNX Runtime cannot load {path.name} ({type(e).__name__})") from e
        return sessions

    def _run(self, role: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(np.asarray(a)) for a in self.sessions[role].run(None, arrays)]

    def encode(self, ids: list[torch.Tensor], masks: list[torch.Tensor]) -> TextOut:
        feeds = {f"ids_{i}": x.to(torch.int64) for i, x in enumerate(ids)}
        feeds |= {f"mask_{i}": m.to(torch.int64) for i, m in enumerate(masks)}
        out = self._run("text", {k: v for k, v in feeds.items() if k in self.text_inputs})
        return TextOut(out[0], out[1] if len(out) > 1 else None)

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is not None:  # prompts of their own lengths: exported graphs take fixed-length states only
            raise CheckpointError("the exported denoiser takes no token mask: serve this model on torch")
        given = {
            "sample": sample,
            "timestep": timestep,
            "states": states,
            "timestep_cond": timestep_cond,
            "pooled": pooled,
            "time_ids": time_ids,
        }
        feeds = {}
        for name in self.unet_inputs:
            value = given.get(name)
            if value is None:
                raise CheckpointError(f"the UNet graph needs {name!r}, which this request does not have")
            feeds[name] = value.float()
        if not self.per_row:
            return self._run("unet", feeds)[0]
        return torch.cat(
            [self._run("unet", {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(len(sample))]
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", {"latents": latents.float()})[0]


def recording(nets: GraphNets, feeds: list[dict[str, np.ndarray]]) -> Callable[..., torch.Tensor]:
    """`nets.unet` that also keeps every call's inputs (calibration data for quantization)."""
    unet = nets.unet

    def rec(*args: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        named = dict(zip(("sample", "timestep", "states", "timestep_cond", "pooled", "time_ids"), args, strict=True))
        feeds.append({k: named[k].float().numpy().copy() for k in nets.unet_inputs})  # type: ignore[union-attr]
        return unet(*args, mask=mask)  # type: ignore[arg-type,misc]

    return rec
