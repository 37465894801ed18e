"""OpenVINO artifacts: a version's ONNX FP32 graphs converted to IR, checked against torch, quantized to INT8
with NNCF and gated, written beside the ONNX artifacts (`artifacts/openvino.py` has the layout).

* **fp32**: each ONNX FP32 graph (hash-checked against its manifest) through `openvino.convert_model`, saved
  uncompressed. Parity as the ONNX export's, against torch: a student's images at every step count and a
  video student's streams (≥ 45 dB), a teacher's raw output, a pipeline's images (≥ 40 dB), or a base
  pipeline's networks call by call. Nothing is left behind when it fails.
* **int8**: NNCF post-training quantization calibrated on the same inputs as ONNX Runtime's INT8 (every
  step of every step count the model serves), then the same gate: a student's judge accuracy and Fréchet
  distance against the FP32 graph's at every step count, a teacher's first-step error, a pipeline's image
  PSNR against its FP32 graphs. NNCF is asked for min-max ranges on the inputs of convolutions and matrix
  products only, asymmetric activations: its defaults (quantile ranges, every quantizable op) gave 9.5 dB on
  the shipped student (docs/decisions/openvino.md). A video student stays FP32, as on ONNX Runtime.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.artifacts import onnx as onnx_art
from fewstep.artifacts import pipeline as pipe_art
from fewstep.artifacts import video as video_art
from fewstep.artifacts.openvino import (
    PRECISIONS,
    ROOT,
    OvGraph,
    artifact_dir,
    graph_entry,
    ov_denoiser,
    weights_name,
    xml_name,
)
from fewstep.artifacts.pipeline import GraphNets, source_digest, verified_graphs
from fewstep.artifacts.video import GraphVideoNet
from fewstep.errors import CheckpointError
from fewstep.evaluation.judges import Judge
from fewstep.models.checkpoint import WEIGHTS, read_manifest, read_verified, replace_dir, write_json_atomic
from fewstep.models.text import TextEncoder


def _tools() -> dict[str, str]:
    import nncf
    import openvino

    return {"torch": torch.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__}


def _onnx_graphs(
    folder: Path, manifest: dict[str, Any]
) -> tuple[dict[str, tuple[Path, list[str], list[str]]], dict[str, Any]]:
    """The version's ONNX FP32 graphs by role (path, inputs, outputs), verified, and their artifact manifest."""
    kind = manifest.get("kind")
    if kind in ("image", "image-teacher"):
        _, art = onnx_art.verified_artifact(folder, manifest, "fp32")
        path = folder / onnx_art.artifact_name("fp32")
        return {"denoiser": (path, list(onnx_art.INPUTS), list(onnx_art.OUTPUTS))}, art
    if kind == "video":
        art = video_art.read_artifact(folder)
        graphs = {}
        for role in video_art.GRAPHS:
            entry = art["graphs"][role]
            read_verified(folder / entry["file"], entry["sha256"], f"{folder.name}: {entry['file']}")
            graphs[role] = (folder / entry["file"], list(video_art.INPUTS[role]), list(video_art.OUTPUTS[role]))
        return graphs, art
    if kind in ("diffusers", "diffusers-teacher"):
        paths, art = verified_graphs(folder, manifest, "fp32")
        return {r: (paths[r], art["graphs"][r]["inputs"], art["graphs"][r]["outputs"]) for r in paths}, art
    raise CheckpointError(f"{folder.name}: kind {kind!r} has no OpenVINO export")


def _source_sha256(manifest: dict[str, Any]) -> str:
    """What the artifact names as its source: the weights (fewstep's models) or the file table (pipelines)."""
    if manifest.get("kind") in ("diffusers", "diffusers-teacher"):
        return source_digest(manifest)
    return str(manifest["files"][WEIGHTS]["sha256"])


def _save(model: Any, built: Path, role: str) -> None:
    import openvino as ov

    ov.save_model(model, str(built / xml_name(role)), compress_to_fp16=False)
    (built / xml_name(role)).with_suffix(".bin").rename(built / weights_name(role))


def _place(built: Path, folder: Path, precision: str) -> None:
    """Move a finished artifact folder into `openvino/<precision>`, replacing an older one whole."""
    replace_dir(built, artifact_dir(folder, precision))


def export_openvino(
    folder: Path,
    encoder: TextEncoder | None,
    precisions: Sequence[str] = PRECISIONS,
    judge: Judge | None = None,
    gate_seeds: int = 4,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `openvino/<precision>/` into the version at `folder` for each of `precisions` (fp32 always, first:
    INT8 is judged against it); returns the artifact manifests by precision. `encoder`: the reference text
    encoder of fewstep's own models (None for an imported pipeline, which brings its own). CheckpointError when the FP32
    parity fails (nothing is written then); a failed INT8 gate is recorded, and the backend refuses it."""
    import openvino as ov

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown OpenVINO precision {unknown[0]!r}; choose from {PRECISIONS}")
    manifest = read_manifest(folder)
    kind = str(manifest.get("kind"))
    if encoder is None and kind in ("image", "image-teacher", "video"):
        raise ValueError(f"a {kind} model is checked with the reference text encoder: pass one")
    onnx_graphs, onnx_manifest = _onnx_graphs(folder, manifest)
    models = {role: ov.convert_model(str(path)) for role, (path, _, _) in onnx_graphs.items()}
    base: dict[str, Any] = {
        "format": 1,
        "kind": kind,
        "source": {"name": manifest["name"], "version": manifest.get("version"), "sha256": _source_sha256(manifest)},
        "derived_from": {"onnx_fp32": {role: _sha(onnx_manifest, kind, role) for role in onnx_graphs}},
        "tools": _tools(),
        # What the pipeline networks need to know of their graphs (arch, time conditioning, size multiple).
        **{
            k: onnx_manifest[k]
            for k in ("arch", "time_cond_dim", "size_multiple", "batch_invariant")
            if k in onnx_manifest
        },
    }
    graphs = {r: OvGraph(m, onnx_graphs[r][1], onnx_graphs[r][2], threads) for r, m in models.items()}
    (folder / ROOT).mkdir(exist_ok=True)
    arts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=folder / ROOT, prefix=".partial-") as tmp_name:
        built = Path(tmp_name) / "fp32"
        built.mkdir()
        parity = _parity(folder, manifest, graphs, encoder)
        for role, model in models.items():
            _save(model, built, role)
        art = {
            **base,
            "precision": "fp32",
            "graphs": {r: graph_entry(built, r, onnx_graphs[r][1], onnx_graphs[r][2]) for r in models},
            "parity": parity,
        }
        write_json_atomic(built / "manifest.json", art)
        _place(built, folder, "fp32")
        arts["fp32"] = art
    if "int8" in precisions and kind != "video":  # video is not quantized, as on ONNX Runtime
        arts["int8"] = _int8(folder, manifest, models, graphs, onnx_graphs, base, encoder, judge, gate_seeds, threads)
    return arts


def _sha(onnx_manifest: dict[str, Any], kind: str, role: str) -> str:
    if kind in ("image", "image-teacher"):
        return str(onnx_manifest["sha256"])
    return str(onnx_manifest["graphs"][role]["sha256"])


def _parity(
    folder: Path, manifest: dict[str, Any], graphs: dict[str, OvGraph], encoder: TextEncoder | None
) -> dict[str, Any]:
    """The FP32 graphs against torch, as the ONNX export checks its own (CheckpointError below the bar)."""
    kind = manifest.get("kind")
    if kind in ("image", "image-teacher"):
        from fewstep.exporters.onnx import student_parity, teacher_parity

        assert encoder is not None
        from fewstep.models.unet import as_denoiser, load_unet

        _, unet = load_unet(folder)
        torch_net = as_denoiser(unet, float(manifest.get("schedule", {}).get("timestep_scale", 1000.0)))
        net = ov_denoiser(graphs["denoiser"])
        if kind == "image":
            return student_parity(manifest, torch_net, net, encoder, what="OpenVINO")
        cfg = manifest["architecture"]["config"]
        return teacher_parity(torch_net, net, encoder, int(cfg.get("in_channels", 3)), int(cfg.get("sample_size", 32)))
    if kind == "video":
        from fewstep.exporters.video_onnx import video_parity

        assert encoder is not None
        from fewstep.models.checkpoint import load_checkpoint
        from fewstep.models.video import VideoDenoiser
        from fewstep.models.video_cache import VideoConfig

        _, state = load_checkpoint(folder)
        cfg = VideoConfig(**manifest["architecture"]["config"])
        ref_net = VideoDenoiser(cfg)
        ref_net.load_state_dict(state)
        ref_net.eval()
        return video_parity(manifest, ref_net, GraphVideoNet(folder, cfg, sessions=graphs), encoder, "video OpenVINO")
    from fewstep.exporters.pipeline_onnx import base_parity, pipeline_parity
    from fewstep.models.pipelines import TorchNets

    onnx_fp32 = pipe_art.describe(folder, "fp32")
    ref = TorchNets(folder, manifest, "cpu", torch.float32)
    fresh = GraphNets({}, onnx_fp32, sessions=graphs)
    return (
        pipeline_parity(folder, ref, fresh, "OpenVINO")
        if "recipe" in manifest
        else base_parity(manifest, folder, ref, fresh)
    )


def nncf_settings() -> dict[str, Any]:
    """How NNCF quantizes: min-max ranges (weights and activations), asymmetric activations (`MIXED`), and only
    the inputs of convolutions and matrix products (as ONNX Runtime's INT8), leaving the element-wise ops,
    normalisations, resizes and attention's own inputs in FP32. A UNet's cross-attention key and value
    projections stay FP32 too: they see only the prompt's tokens (cheap), and OpenVINO 2026.4's CPU plugin
    cannot compile their per-channel dequantization ahead of the head reshape."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    skipped = ["Add", "Multiply", "Subtract", "Divide", "MVN", "Interpolate", "ScaledDotProductAttention", "Concat"]
    return {
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": nncf.IgnoredScope(types=skipped, patterns=[r".*attn2/to_[kv]/.*"], validate=False),
        "advanced_parameters": AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
            weights_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        ),
    }


def quantize_model(model: Any, feeds: list[dict[str, np.ndarray]], inputs: Sequence[str]) -> Any:
    """`model` quantized to INT8 by NNCF, calibrated on every one of `feeds`."""
    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)  # not a line per quantizer on the export's output
    names = list(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(
            model,
            nncf.Dataset(feeds, lambda f: {k: f[k] for k in names}),
            subset_size=len(feeds),
            **nncf_settings(),
        )


def _int8(
    folder: Path,
    manifest: dict[str, Any],
    models: dict[str, Any],
    fp32: dict[str, OvGraph],
    onnx_graphs: dict[str, tuple[Path, list[str], list[str]]],
    base: dict[str, Any],
    encoder: TextEncoder | None,
    judge: Judge | None,
    gate_seeds: int,
    threads: int | None,
) -> dict[str, Any]:
    kind = manifest.get("kind")
    if kind in ("image", "image-teacher"):
        from fewstep.exporters.quantize import CALIBRATION_PROMPTS, StudentReference, calibration_feeds, teacher_quality

        assert encoder is not None
        feeds = calibration_feeds(folder, manifest, encoder)
        role = "denoiser"
        quantized = quantize_model(models[role].clone(), feeds, onnx_art.INPUTS)
        ref, net = ov_denoiser(fp32[role]), ov_denoiser(OvGraph(quantized, *onnx_graphs[role][1:], threads))
        if kind == "image":
            quality = StudentReference(manifest, ref, encoder, judge, gate_seeds).judge(net)
        else:
            quality = teacher_quality(ref, net, feeds)
        calibration = {"inputs": len(feeds), "prompts": len(CALIBRATION_PROMPTS), "step_aware": kind == "image"}
    else:
        from fewstep.exporters.pipeline_onnx import calibration_record, unet_calibration, unet_gate

        paths, onnx_fp32 = verified_graphs(folder, manifest, "fp32")
        feeds = unet_calibration(folder, manifest, paths, onnx_fp32)
        role = "unet"
        quantized = quantize_model(models[role].clone(), feeds, onnx_graphs[role][1])
        ref_nets = GraphNets({}, onnx_fp32, sessions=fp32)
        unet = OvGraph(quantized, *onnx_graphs[role][1:], threads)
        quality = unet_gate(folder, manifest, ref_nets, GraphNets({}, onnx_fp32, sessions={**fp32, role: unet}))
        calibration = calibration_record(manifest, feeds)
    with tempfile.TemporaryDirectory(dir=folder / ROOT, prefix=".partial-") as tmp_name:
        built = Path(tmp_name) / "int8"
        built.mkdir()
        for r, model in {**models, role: quantized}.items():
            _save(model, built, r)
        art = {
            **base,
            "precision": "int8",
            "graphs": {r: graph_entry(built, r, onnx_graphs[r][1], onnx_graphs[r][2]) for r in models},
            "quantized": [role],
            "quantizer": {"tool": "nncf", "preset": "mixed", "ranges": "min-max", "ops": ["Convolution", "MatMul"]},
            "calibration": calibration,
            **quality,
        }
        write_json_atomic(built / "manifest.json", art)
        _place(built, folder, "int8")
    return art
