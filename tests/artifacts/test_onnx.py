"""What an ONNX artifact is and how it is opened: the execution providers chosen."""

from __future__ import annotations

from fewstep.artifacts.onnx import choose_providers


def test_provider_preference_falls_back_to_cpu() -> None:
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(gpu) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu, allow_tensorrt=False) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers([]) == ["CPUExecutionProvider"]
