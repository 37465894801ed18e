"""A version's OpenVINO artifacts: its ONNX graphs converted to OpenVINO IR (and INT8 by NNCF), opened verified.

Layout inside a registry version, the same for every model kind (artifacts are additions; the version's
manifest is never rewritten):

    openvino/fp32/manifest.json       what the graphs are, each file's sha256, parity, the source they came from
    openvino/fp32/<role>.ir.xml       the IR's topology
    openvino/fp32/<role>.ir.weights   its weights: a raw blob, read into memory and never unpickled (OpenVINO
                                      names it `.bin`, which the registry refuses as a possible pickle)
    openvino/int8/...                 the INT8 graphs (NNCF), with calibration, quality and the gate

Roles: `denoiser` (a fewstep image model or teacher), `text`, `denoise`, `keys_values` (a video student),
`text`, `unet`, `vae_decoder` (an imported pipeline: the INT8 artifact quantizes the UNet, the others are
the FP32 graphs again). Each graph is compiled from the bytes that were hashed; batch (and the pipelines'
spatial) axes stay dynamic.

`OvGraph` answers the calls the ONNX Runtime code makes of a session (`run(names, feeds)`,
`get_inputs()`), so the video and pipeline networks run on either runtime unchanged.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.artifacts.onnx import denoiser_feeds
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import check_relative, read_verified, sha256_file
from fewstep.models.unet import Denoiser

ROOT = "openvino"
PRECISIONS = ("fp32", "int8")
ROLES: dict[str, tuple[str, ...]] = {
    "image": ("denoiser",),
    "image-teacher": ("denoiser",),
    "video": ("text", "denoise", "keys_values"),
    "diffusers": ("text", "unet", "vae_decoder"),
    "diffusers-teacher": ("text", "unet", "vae_decoder"),
}
"""The graphs of each manifest kind."""


def artifact_dir(folder: Path, precision: str) -> Path:
    return folder / ROOT / precision


def xml_name(role: str) -> str:
    return f"{role}.ir.xml"


def weights_name(role: str) -> str:
    return f"{role}.ir.weights"


def _file(root: Path, path: Path) -> dict[str, Any]:
    return {"file": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def graph_entry(root: Path, role: str, inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, Any]:
    """The manifest entry of graph `role` written under `root` (`openvino/<precision>/`)."""
    return {
        "xml": _file(root, root / xml_name(role)),
        "weights": _file(root, root / weights_name(role)),
        "inputs": list(inputs),
        "outputs": list(outputs),
    }


def describe(folder: Path, precision: str) -> dict[str, Any]:
    """The OpenVINO artifact manifest of `folder` for `precision`; CheckpointError when there is none."""
    path = artifact_dir(folder, precision) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: no {precision} OpenVINO artifact; run `fewstep export --openvino`")
    return dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class IR:
    """One graph's IR as read and hash-checked, with the names the manifest gives its inputs and outputs."""

    xml: bytes
    weights: bytes
    inputs: list[str]
    outputs: list[str]


def verified_graphs(
    folder: Path, kind: str, source_sha256: str, precision: str
) -> tuple[dict[str, IR], dict[str, Any]]:
    """The graphs of `precision` (bytes read once and hashed) and the artifact manifest, when they may be
    served: every file matches its sha256, the artifact was made from `source_sha256` (this version's own
    weights), a quantized artifact passed its quality gate, and it has every graph of `kind`.
    CheckpointError otherwise."""
    if precision not in PRECISIONS:
        raise CheckpointError(f"openvino serves {PRECISIONS}, not {precision!r}")
    art = describe(folder, precision)
    if art.get("source", {}).get("sha256") != source_sha256:
        raise CheckpointError(f"{folder.name}: the {precision} OpenVINO graphs were made from other weights")
    if precision != "fp32" and not art.get("gate", {}).get("passed"):
        raise CheckpointError(
            f"{folder.name}: {precision} OpenVINO graphs failed their quality gate ({art.get('gate')})"
        )
    root = artifact_dir(folder, precision)
    graphs: dict[str, IR] = {}
    for role in ROLES[kind]:
        entry = art.get("graphs", {}).get(role)
        if not entry:
            raise CheckpointError(f"{folder.name}: the {precision} OpenVINO artifact has no {role} graph")
        blobs = []
        for part in ("xml", "weights"):
            f = entry[part]
            path = root / check_relative(f["file"])
            if path.is_symlink() or not path.is_file():
                raise CheckpointError(f"{folder.name}: {ROOT}/{precision}/{f['file']} is missing")
            blobs.append(read_verified(path, f["sha256"], f"{folder.name}: {ROOT}/{precision}/{f['file']}"))
        graphs[role] = IR(blobs[0], blobs[1], list(entry["inputs"]), list(entry["outputs"]))
    return graphs, art


_core_lock = threading.Lock()
_core: Any = None


def core() -> Any:
    """The process's one OpenVINO `Core` (it caches devices and plugins; compiled models share it)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def compile_config(threads: int | None) -> dict[str, Any]:
    """CPU plugin settings: this process's thread budget (as torch's: oversubscription on a small CPU is
    catastrophic), FP32 arithmetic where the graph is FP32 (a CPU with bf16 units would otherwise run it in
    bf16 and break parity), one stream, and no thread pinning (the cores are shared with torch and HTTP)."""
    return {
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "ENABLE_CPU_PINNING": False,
    }


@dataclass(frozen=True)
class _Name:
    name: str


class OvGraph:
    """One compiled graph, called as an ONNX Runtime session is (`run`, `get_inputs`). Thread-safe: each call
    takes an infer request of its own from a pool (a request runs one inference at a time)."""

    def __init__(self, ir: IR | Any, inputs: Sequence[str], outputs: Sequence[str], threads: int | None = None) -> None:
        """`ir`: an `IR` (bytes from a verified artifact) or an `openvino.Model` (while exporting)."""
        c = core()
        try:
            if isinstance(ir, IR):
                import openvino as ov

                model = c.read_model(ir.xml.decode(), ov.Tensor(np.frombuffer(ir.weights, dtype=np.uint8)))
            else:
                model = ir
            self.compiled = c.compile_model(model, "CPU", compile_config(threads))
        except CheckpointError:
            raise
        except Exception as e:  # OpenVINO raises its own exception types for bad graphs
            raise CheckpointError(f"OpenVINO cannot compile the graph ({type(e).__name__}: {e})") from e
        self.inputs, self.outputs = list(inputs), list(outputs)
        self._in = {name: self._port(self.compiled.inputs, name) for name in self.inputs}
        self._out = {name: self._port(self.compiled.outputs, name) for name in self.outputs}
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @staticmethod
    def _port(ports: Any, name: str) -> Any:
        # A converted graph may give a port more names than the exporter's (an input read through a Cast is
        # also named for it): the manifest's name must be one of them.
        for port in ports:
            if name in port.get_names():
                return port
        raise CheckpointError(f"the OpenVINO graph has no port named {name!r}")

    def get_inputs(self) -> list[_Name]:
        return [_Name(n) for n in self.inputs]

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs `names` (None: all, in the manifest's order) for `feeds` by input name."""
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            result = request.infer({self._in[k]: np.ascontiguousarray(v) for k, v in feeds.items()})
            return [np.array(result[self._out[n]]) for n in (names or self.outputs)]  # copied out of the request
        finally:
            self._requests.put(request)


def ov_denoiser(graph: OvGraph) -> Denoiser:
    """A `Denoiser` on an OpenVINO graph (inputs x, t, states, mask → v)."""

    def net(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(graph.run(["v"], denoiser_feeds(x, t, states, mask))[0])

    net.graph = graph  # type: ignore[attr-defined]
    return net
