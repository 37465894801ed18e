"""INT8 and FP8 quantization of an exported ONNX denoiser, step-aware calibrated and quality-gated.

Precisions (each an artifact `model.<precision>.onnx` + `.json` beside `model.fp32.onnx`):

* `int8`: static QDQ, per-channel symmetric INT8 weights and symmetric INT8 activations
  (the form TensorRT consumes), Conv/MatMul/Gemm, MinMax ranges;
* `int8-dynamic`: dynamic INT8 on MatMul/Gemm only; on a CPU the variant that is both accurate
  and faster (research/stack-notes.md). Its activation ranges come from the whole batch, which
  breaks batch invariance: the backend runs it one item per call to keep the determinism contract;
* `fp8`: static QDQ in E4M3FN, per-tensor, every Conv/MatMul/Gemm (Softmax left out, ORT cannot
  range it); scales are amax / 448 (E4M3's largest value) for weights and activations, the
  calibrated absolute maximum, as TensorRT's FP8 recipe. ORT's own FP8 scale (from the standard
  deviation of |x|; ~2.7σ for a Gaussian) saturates ~1 % of every activation: 17–18 dB PSNR vs
  FP32 and up to 2.2× its Fréchet distance on the shipped student, against ~27 dB and within 3 %
  with amax.
  On a CPU it runs only as emulation, to measure its quality; TensorRT runs the same graph on
  Hopper GPUs.

Calibration is step-aware: the inputs are recorded from real denoising trajectories of *every*
step schedule the student serves (1–4 NFE), so every timestep it will see is in the set. A
teacher is calibrated on its first-step inputs with CFG, the only way the hybrid uses it.

The quality gate: a student artifact is judged by the attribute classifier at every step count
on held-out prompts, against the FP32 artifact on the same seeds; it passes when its joint
accuracy is within `GATE_POINTS` of FP32's everywhere and, where the judge gives one, its Fréchet
distance to real data is at most `FRECHET_RISE` above FP32's (the continuous signal: a saturated
accuracy does not move for a subtle loss). A failed gate is recorded in the manifest
and the onnxruntime backend refuses the artifact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.artifacts.onnx import QUANTIZED, artifact_name, describe, session_denoiser
from fewstep.evaluation.judges import FRECHET, Judge
from fewstep.evaluation.metrics import psnr
from fewstep.evaluation.probes import heldout_probes
from fewstep.models.checkpoint import read_manifest, sha256_file, write_json_atomic
from fewstep.models.sampling import cfg_flow, student_sample_mixed, to_pixels
from fewstep.models.schedules import FewStepSchedule, TeacherSampler
from fewstep.models.text import TextEncoder
from fewstep.models.unet import Denoiser

GATE_POINTS = 0.02
FRECHET_RISE = 0.25
"""As the serving gate's default `gate_max_frechet_rise`."""
CALIBRATION_PROMPTS = (
    "a red circle",
    "a green square on a black background",
    "a large blue triangle",
    "a yellow cross",
    "a purple dot in the top left",
    "a small sapphire box",
    "lemon pyramid",
    "a picture of a violet plus",
)


def _recording(net: Denoiser, feeds: list[dict[str, np.ndarray]]) -> Denoiser:
    def rec(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feeds.append(
            {"x": x.numpy().copy(), "t": t.numpy().copy(), "states": states.numpy().copy(), "mask": mask.numpy().copy()}
        )
        return net(x, t, states, mask)

    return rec


def calibration_feeds(
    folder: Path, manifest: dict[str, Any], encoder: TextEncoder, seeds_per_prompt: int = 2
) -> list[dict[str, np.ndarray]]:
    """Real denoiser inputs: every step of every schedule (student) or the CFG first step (teacher)."""
    fp32 = session_denoiser(folder / artifact_name("fp32"), providers=["CPUExecutionProvider"])
    prompts = [p for p in CALIBRATION_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [7_000_000 + i for i in range(len(prompts))]
    states, mask = encoder.encode(prompts)
    feeds: list[dict[str, np.ndarray]] = []
    if manifest.get("kind") == "image":
        schedule = FewStepSchedule.from_dict(manifest["schedule"])
        for steps in schedule.steps:
            student_sample_mixed(_recording(fp32, feeds), schedule, [steps] * len(seeds), states, mask, seeds)
    else:
        sampler = TeacherSampler.from_dict(manifest["sampler"])
        null_s, null_m = encoder.encode([""])
        g = torch.Generator().manual_seed(7)
        x = torch.randn((len(seeds), 3, 32, 32), generator=g)
        cfg_flow(_recording(fp32, feeds), x, torch.ones(len(seeds)), states, mask, null_s, null_m, sampler.guidance)
    return feeds


@contextlib.contextmanager
def _inside(path: Path) -> Iterator[None]:
    """The quantization tools drop temporary files into the working directory: keep them in `path`."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def quantize_graph(
    src: Path, dst: Path, precision: str, feeds: list[dict[str, np.ndarray]], tmp: Path, external_data: bool = False
) -> None:
    """Quantize the ONNX graph `src` into `dst` (scratch files in `tmp`), calibrated on `feeds`; with
    `external_data`, the weights go to `dst`'s `.data` file (graphs over protobuf's limit)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with _inside(tmp):
        pre = tmp / "pre.onnx"
        quant_pre_process(
            str(src),
            str(pre),
            skip_symbolic_shape=True,
            save_as_external_data=external_data,
            all_tensors_to_one_file=True,
        )
        if precision == "int8-dynamic":
            quantize_dynamic(
                str(pre),
                str(dst),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=external_data,
            )
        elif precision in ("int8", "fp8"):
            static: dict[str, dict[str, Any]] = {
                # Symmetric INT8 on both sides: the form TensorRT consumes.
                "int8": {
                    "per_channel": True,
                    "activation_type": QuantType.QInt8,
                    "weight_type": QuantType.QInt8,
                    "calibrate_method": CalibrationMethod.MinMax,
                    "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True},
                },
                # quantize_static takes FP8 only with Distribution; the ranges it reads are collected by
                # MinMax in `_fp8_amax_scales`, and every scale is replaced there by amax / 448
                # (TensorQuantOverrides); per-tensor weights, as TensorRT's FP8.
                # No node is left out: conv_in/conv_out and the time/text embedding Gemms run in FP8 too,
                # the whole graph passes the gate with amax scales.
                "fp8": {
                    "per_channel": False,
                    "activation_type": QuantType.QFLOAT8E4M3FN,
                    "weight_type": QuantType.QFLOAT8E4M3FN,
                    "calibrate_method": CalibrationMethod.Distribution,
                    # Biases stay FP32: ORT's FP8 bias path re-scans every FP8 initializer in Python for
                    # each bias (25 s of the student's 35 s quantization here), for the same images.
                    "extra_options": {"QuantizeBias": False},
                },
            }
            ops = ["Conv", "MatMul", "Gemm"]
            calibration: dict[str, Any] = {"calibration_data_reader": Reader()}
            if precision == "fp8":
                overrides, cache = _fp8_amax_scales(pre, ops, Reader(), tmp, external_data)
                static["fp8"]["extra_options"]["TensorQuantOverrides"] = overrides
                if cache is not None:  # reuse the ranges just collected instead of calibrating again
                    calibration = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
            quantize_static(
                str(pre),
                str(dst),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=ops,
                use_external_data_format=external_data,
                **calibration,
                **static[precision],
            )
        else:
            raise ValueError(f"unknown precision {precision!r}; choose from {QUANTIZED}")


FP8_MAX = 448.0
"""E4M3FN's largest finite value."""


def _fp8_amax_scales(
    pre: Path, ops: list[str], reader: Any, tmp: Path, external_data: bool
) -> tuple[dict[str, list[dict[str, Any]]], Path | None]:
    """FP8 scales as TensorRT's recipe sets them: the calibrated absolute maximum of every activation, and
    each weight's, mapped to `FP8_MAX` (zero point 0); returned as ORT `TensorQuantOverrides`, with the
    ranges collected here saved as a calibration cache (None on an ORT too old to read one).

    Why not ORT's own FP8 scale: it is std(|x|) / std(E4M3 values), i.e. it saturates at ~4.5 standard
    deviations of |x|, clipping ~1 % of every SiLU/GELU output, attention probability and residual sum
    (15-37 % relative error per tensor on the shipped student). E4M3's 3-bit mantissa has the same relative
    precision over 2^17 of range, so scaling the absolute maximum to 448 clips nothing and costs little."""
    import inspect

    import onnx
    from ml_dtypes import float8_e4m3fn
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, quantize_static

    cal = create_calibrator(
        pre,
        ops,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external_data,
    )
    cal.collect_data(reader)
    ranges = cal.compute_data()  # MinMax: range_value = (min, max) of x
    del cal
    zero = np.array(0, dtype=float8_e4m3fn)
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, data in ranges.items():
        amax = np.abs(np.asarray(data.range_value)).max()
        overrides[name] = [{"scale": np.array(max(float(amax), 1e-12) / FP8_MAX, dtype=amax.dtype), "zero_point": zero}]
    graph = onnx.load(str(pre))
    weights = {w.name: w for w in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ops and len(node.input) > 1 and node.input[1] in weights:
            w = np.abs(onnx.numpy_helper.to_array(weights[node.input[1]])).max()
            overrides[node.input[1]] = [{"scale": np.float32(max(float(w), 1e-12) / FP8_MAX), "zero_point": 0}]
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return overrides, None
    from onnxruntime.quantization import save_tensors_data
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    # quantize_static takes FP8 only from a Distribution calibration, and checks the cache's method; every
    # scale is overridden above, so the cache carries the same ranges as |x| (what Distribution records).
    # Collecting them with MinMax instead skips 2048-bin histograms of every activation: 13 → 5 s here.
    as_distribution = {}
    for name, data in ranges.items():
        amax = np.abs(np.asarray(data.range_value)).max().astype(np.float32)
        as_distribution[name] = TensorData(lowest=np.float32(0), highest=amax, avg=np.float32(0), std=amax)
    cache = tmp / "calibration.json"
    save_tensors_data(TensorsData(CalibrationMethod.Distribution, as_distribution), cache)
    return overrides, cache


def quantize(
    folder: Path,
    precisions: Sequence[str],
    encoder: TextEncoder,
    judge: Judge | None = None,
    gate_seeds: int = 4,
) -> dict[str, dict[str, Any]]:
    """Write `model.<precision>.onnx` (+ manifest with calibration, PSNR and gate) into `folder` for each
    of `precisions`, and return their manifests by precision. The calibration inputs and the FP32
    outputs every artifact is judged against are computed once for all of them."""
    unknown = [p for p in precisions if p not in QUANTIZED]
    if unknown:
        raise ValueError(f"unknown precision {unknown[0]!r}; choose from {QUANTIZED}")
    if not precisions:
        return {}
    manifest = read_manifest(folder)
    fp32 = describe(folder, "fp32")
    feeds = calibration_feeds(folder, manifest, encoder)
    ref = session_denoiser(folder / artifact_name("fp32"), providers=["CPUExecutionProvider"])
    student = manifest.get("kind") == "image"
    reference = StudentReference(manifest, ref, encoder, judge, gate_seeds) if student else None
    arts: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        target = folder / artifact_name(precision)
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            out = tmp / target.name
            quantize_graph(folder / artifact_name("fp32"), out, precision, feeds, tmp)
            net = session_denoiser(out, providers=["CPUExecutionProvider"])
            quality = reference.judge(net) if reference is not None else teacher_quality(ref, net, feeds)
            os.replace(out, target)
        arts[precision] = {
            **{k: fp32[k] for k in ("format", "input_order", "inputs", "outputs", "opset", "source")},
            "artifact": target.name,
            "precision": precision,
            # Dynamic quantization takes activation ranges from the whole batch, so an item's
            # output depends on its neighbours; serving it must go item by item.
            "batch_invariant": precision != "int8-dynamic",
            "derived_from": {"artifact": fp32["artifact"], "sha256": fp32["sha256"]},
            "calibration": {
                "inputs": len(feeds),
                "prompts": len(CALIBRATION_PROMPTS),
                "step_aware": student,
            },
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
            **quality,
        }
        write_json_atomic(folder / (target.name + ".json"), arts[precision])
    return arts


class StudentReference:
    """The FP32 student's images (and their accuracy) on held-out probes at every step count, sampled once;
    `judge` scores a quantized denoiser against them."""

    def __init__(
        self, manifest: dict[str, Any], ref: Denoiser, encoder: TextEncoder, judge: Judge | None, gate_seeds: int
    ) -> None:
        self.schedule = FewStepSchedule.from_dict(manifest["schedule"])
        self.probes = heldout_probes(gate_seeds, first_seed=8_000_000)
        self.seeds = list(self.probes.seeds)
        self.states, self.mask = encoder.encode(list(self.probes.prompts))
        self.scorer = judge
        self.images = {steps: self._sample(ref, steps) for steps in self.schedule.steps}
        self.scores = {steps: self._scores(x) for steps, x in self.images.items()}

    def _sample(self, net: Denoiser, steps: int) -> torch.Tensor:
        return student_sample_mixed(net, self.schedule, [steps] * len(self.seeds), self.states, self.mask, self.seeds)

    def _scores(self, x: torch.Tensor) -> dict[str, float]:
        return {} if self.scorer is None else self.scorer.score(self.probes, x.clamp(-1, 1).numpy())

    def judge(self, net: Denoiser) -> dict[str, Any]:
        by_steps: dict[str, dict[str, float | None]] = {}
        passed = True
        for steps, a in self.images.items():
            b = self._sample(net, steps)
            db = psnr(to_pixels(a), to_pixels(b))
            row: dict[str, float | None] = {"psnr_db_vs_fp32": None if np.isinf(db) else round(db, 2)}
            if self.scorer is not None:
                theirs, ours = self.scores[steps], self._scores(b)
                row.update({"joint_fp32": theirs["joint_accuracy"], "joint": ours["joint_accuracy"]})
                passed = passed and ours["joint_accuracy"] >= theirs["joint_accuracy"] - GATE_POINTS
                if FRECHET in ours and FRECHET in theirs:
                    row.update({"frechet_fp32": round(theirs[FRECHET], 3), "frechet": round(ours[FRECHET], 3)})
                    passed = passed and ours[FRECHET] <= theirs[FRECHET] * (1 + FRECHET_RISE)
            by_steps[str(steps)] = row
        quality = {"by_steps": by_steps, "images": len(self.seeds)}
        if self.scorer is None:
            return {"quality": quality, "gate": {"passed": False, "reason": "no judge given: quality not measured"}}
        rule = (
            f"joint accuracy >= FP32's - {GATE_POINTS} and Fréchet distance to real data <= FP32's × "
            f"{1 + FRECHET_RISE:g} at every step count"
        )
        return {"quality": quality, "gate": {"passed": passed, "rule": rule}}


def teacher_quality(ref: Denoiser, net: Denoiser, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    errs = []
    for f in feeds:
        args = [torch.from_numpy(f[k]) for k in ("x", "t", "states", "mask")]
        a, b = ref(*args), net(*args)
        errs.append(float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt().clamp(min=1e-8)))
    rel = float(np.mean(errs))
    return {
        "quality": {"relative_rms_error_vs_fp32": rel},
        "gate": {"passed": rel <= 0.1, "rule": "relative RMS error of the first-step prediction <= 0.1"},
    }
