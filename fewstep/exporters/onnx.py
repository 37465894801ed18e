"""Export a UNet checkpoint's denoiser to ONNX, check it against torch, write it into the version folder.

The graph is the whole `Denoiser`: inputs `x` (B, C, H, W), `t` (B,) in [0, 1], `states`
(B, L, 384) and `mask` (B, L); output `v`. Text-encoder outputs are inputs, so one graph serves
every prompt, and the batch axis is dynamic. The artifact `model.fp32.onnx` lands beside the
weights with `model.fp32.onnx.json`: opset, I/O names, shapes and dtypes, the sha256 of the ONNX
file and of the source weights, tool versions, and the parity figures. The checkpoint's own
`manifest.json` is never rewritten (registry versions are immutable); artifacts are additions.

Parity: the student is sampled by torch and by ONNX Runtime through the same sampling loop
(same prompts, seeds and step counts); the export fails below `MIN_PSNR_DB` at any step count.
A teacher is checked on raw denoiser outputs instead (it is only ever used for one step).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fewstep.artifacts.onnx import INPUTS, OUTPUTS, artifact_name, session_denoiser
from fewstep.errors import CheckpointError
from fewstep.evaluation.metrics import psnr
from fewstep.models.checkpoint import WEIGHTS, sha256_file, write_json_atomic
from fewstep.models.sampling import student_sample_mixed, to_pixels
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser, as_denoiser, denoise, load_unet

MIN_PSNR_DB = 45.0
MAX_TEACHER_DIFF = 1e-3
PARITY_PROMPTS = ("a red circle", "a blue square on a white background", "a small yellow triangle", "a purple cross")


class DenoiserGraph(torch.nn.Module):
    """The exported computation: `denoise` with the checkpoint's timestep scale folded in."""

    def __init__(self, unet: torch.nn.Module, timestep_scale: float) -> None:
        super().__init__()
        self.unet = unet
        self.timestep_scale = timestep_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return denoise(self.unet, x, t, states, mask, self.timestep_scale)


def _load_torch(folder: Path) -> tuple[dict[str, Any], torch.nn.Module, float]:
    manifest, unet = load_unet(folder)
    scale = float(manifest.get("schedule", {}).get("timestep_scale", 1000.0))
    return manifest, unet, scale


def export_onnx(folder: Path, encoder: TextEncoder, precision: str = "fp32") -> dict[str, Any]:
    """Write `model.fp32.onnx` (+ manifest) into checkpoint `folder`; returns the artifact manifest.

    Raises CheckpointError when parity fails; nothing is left behind then.
    """
    if precision != "fp32":
        raise ValueError(f"export_onnx writes the fp32 graph; {precision!r} is a quantization of it")
    manifest, unet, scale = _load_torch(folder)
    in_ch = int(manifest["architecture"]["config"].get("in_channels", 3))
    size = int(manifest["architecture"]["config"].get("sample_size", 32))
    states, mask = encoder.encode(list(PARITY_PROMPTS[:2]))
    example = (torch.randn(2, in_ch, size, size), torch.rand(2), states, mask)
    target = folder / artifact_name(precision)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_path = Path(tmp) / target.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: 1.2 s against 26 s for `dynamo=True` on the shipped student, the
            # same parity (docs/decisions/pipeline-onnx.md). The UNet has no data-dependent control
            # flow for tracing to freeze, and the parity check below runs every step count.
            torch.onnx.export(
                DenoiserGraph(unet, scale),
                example,
                str(tmp_path),
                dynamo=False,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)},
                verbose=False,
            )
        net = _ort_denoiser(tmp_path)
        parity = (
            student_parity(manifest, as_denoiser(unet, scale), net, encoder)
            if manifest.get("kind") == "image"
            else teacher_parity(as_denoiser(unet, scale), net, encoder, in_ch, size)
        )
        os.replace(tmp_path, target)
    import onnx

    graph = onnx.load(str(target), load_external_data=False)
    art = {
        "format": 1,
        "artifact": target.name,
        "precision": precision,
        "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "input_order": list(INPUTS),
        "inputs": {
            "x": {"dtype": "float32", "shape": ["batch", in_ch, size, size]},
            "t": {"dtype": "float32", "shape": ["batch"]},
            "states": {"dtype": "float32", "shape": ["batch", int(states.shape[1]), int(states.shape[2])]},
            "mask": {"dtype": "float32", "shape": ["batch", int(mask.shape[1])]},
        },
        "outputs": {"v": {"dtype": "float32", "shape": ["batch", in_ch, size, size]}},
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        **provenance(manifest),
        "parity": parity,
    }
    write_json_atomic(folder / (target.name + ".json"), art)
    return art


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """What an artifact was made from (the checkpoint's weights, by sha256) and with which tools."""
    import onnx
    import onnxruntime

    return {
        "source": {
            "name": manifest["name"],
            "version": manifest.get("version"),
            "sha256": manifest["files"][WEIGHTS]["sha256"],
        },
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _ort_denoiser(path: Path) -> Denoiser:
    return session_denoiser(path, providers=["CPUExecutionProvider"])


def student_parity(
    manifest: dict[str, Any], ref: Denoiser, net: Denoiser, encoder: TextEncoder, what: str = "ONNX"
) -> dict[str, Any]:
    """`net`'s images against `ref`'s (torch) at every step count the student serves; CheckpointError below
    `MIN_PSNR_DB`."""
    schedule = FewStepSchedule.from_dict(manifest["schedule"])
    prompts = [p for p in PARITY_PROMPTS for _ in range(2)]
    seeds = list(range(len(prompts)))
    states, mask = encoder.encode(prompts)
    figures: dict[str, float] = {}
    for steps in schedule.steps:
        a = to_pixels(student_sample_mixed(ref, schedule, [steps] * len(seeds), states, mask, seeds))
        b = to_pixels(student_sample_mixed(net, schedule, [steps] * len(seeds), states, mask, seeds))
        figures[str(steps)] = psnr(a, b)
    return psnr_parity(figures, what, images=len(seeds))


def psnr_parity(figures: dict[str, float], what: str, min_db: float = MIN_PSNR_DB, **counts: int) -> dict[str, Any]:
    """The parity record of PSNRs by step count; CheckpointError when any is below `min_db`."""
    worst = min(figures.values())
    if worst < min_db:
        raise CheckpointError(f"{what} parity failed: PSNR {worst:.1f} dB < {min_db} dB ({figures})")
    return {
        "metric": "psnr_db_vs_torch",
        "min_required": min_db,
        **counts,
        "null_means": "identical pixels (infinite PSNR)",
        "by_steps": {k: (None if math.isinf(v) else round(v, 2)) for k, v in figures.items()},
    }


def teacher_parity(ref: Denoiser, net: Denoiser, encoder: TextEncoder, in_ch: int, size: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    states, mask = encoder.encode(list(PARITY_PROMPTS))
    n = len(PARITY_PROMPTS)
    x, t = torch.randn((n, in_ch, size, size), generator=g), torch.rand(n, generator=g)
    with torch.inference_mode():
        diff = float((ref(x, t, states, mask) - net(x, t, states, mask)).abs().max())
    if diff > MAX_TEACHER_DIFF:
        raise CheckpointError(f"ONNX parity failed: max |v_onnx - v_torch| = {diff:.2e} > {MAX_TEACHER_DIFF}")
    return {"metric": "max_abs_diff_vs_torch", "max_allowed": MAX_TEACHER_DIFF, "value": diff}
