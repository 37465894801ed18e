"""Checkpoint → deployable artifacts (ONNX now; INT8/FP8 QDQ and TensorRT engines next), each with a manifest."""
