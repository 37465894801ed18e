"""Exported artifacts: what an ONNX artifact of a checkpoint is, and how to open one verified.

The exporters write these artifacts and check them against torch; the engines' backends serve them.
Both import this package, which imports only `fewstep.models` and `fewstep.errors`: the file names, the
graphs' inputs and outputs, the artifact manifests (`<artifact>.json`) and the ONNX Runtime sessions.
"""
