"""Judges: what scores a model's outputs for a probe set. One protocol, one table of judge models.

A model's manifest names its judge (`"evaluation": {"judge": NAME}`), a registry model whose own
manifest says which network it is; `JUDGES` maps that network to a loader. A model that names no
judge, or whose judge the registry lacks, is judged on structure and agreement alone (the serving
gate's fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fewstep.errors import CheckpointError
from fewstep.evaluation import motion, shapes
from fewstep.evaluation.classifier import ARCHITECTURE, AttributeClassifier, load_classifier, predict
from fewstep.evaluation.metrics import frechet
from fewstep.evaluation.probes import ProbeSet

FRECHET = "frechet_to_real"
"""The continuous score: Fréchet distance between the judge's features of the outputs and of real data. Lower is
better; it moves with quality long before an accuracy does (a saturated judge reads 1.00 for a subtle
regression whose Fréchet distance has risen by half)."""


class Judge(Protocol):
    """Scores what a model made for a probe set."""

    def score(self, probes: ProbeSet, outputs: np.ndarray) -> dict[str, float]:
        """Scores of `outputs` made for `probes`: images (N, 3, H, W) or streams (N, F, 3, H, W), in [-1, 1].
        Every `*_accuracy` is in [0, 1], higher is better; `FRECHET`, where the judge gives it, is a
        distance ≥ 0, lower is better. Raises ValueError when the set has no truth this judge reads."""
        ...


REAL_SEED, REAL_IMAGES = 31_415_926, 1000
"""The real images an attribute judge measures Fréchet distances against (fixed: every process agrees)."""


class AttributeJudge:
    """Shape and colour by an attribute classifier (joint accuracy, and the Fréchet distance of its features from
    real images'); for streams also motion, by the tracker."""

    def __init__(self, model: AttributeClassifier) -> None:
        self.model = model
        self._real: np.ndarray | None = None

    def real_features(self) -> np.ndarray:
        """The classifier's features of `REAL_IMAGES` fixed real images (computed once)."""
        if self._real is None:
            images, _, _ = shapes.batch(REAL_SEED, 0, REAL_IMAGES)
            self._real = predict(self.model, images)[2]
        return self._real

    def score(self, probes: ProbeSet, outputs: np.ndarray) -> dict[str, float]:
        if outputs.ndim == 5:
            if len(probes.clips) != len(outputs):
                raise ValueError(f"probe set {probes.name!r} names no motion to judge streams against")
            window = motion.score_streams(self.model, outputs, list(probes.clips)).window(0, outputs.shape[1])
            return {"joint_accuracy": window["joint"], "motion_accuracy": window["motion"]}
        if len(probes.labels) != len(outputs):
            raise ValueError(f"probe set {probes.name!r} has no labels to judge images against")
        s, c, feats = predict(self.model, outputs)
        return {"joint_accuracy": _joint(s, c, probes.labels), FRECHET: frechet(feats, self.real_features())}


def joint_accuracy(model: AttributeClassifier, images: np.ndarray, labels: tuple[tuple[str, str], ...]) -> float:
    """Share of (N, 3, H, W) images in [-1, 1] whose shape and colour are both the label's (colour, shape)."""
    s, c, _ = predict(model, images)
    return _joint(s, c, labels)


def _joint(s: np.ndarray, c: np.ndarray, labels: tuple[tuple[str, str], ...]) -> float:
    ys = np.array([shapes.SHAPES.index(shape) for _, shape in labels])
    yc = np.array([shapes.COLOUR_NAMES.index(colour) for colour, _ in labels])
    return float(((s == ys) & (c == yc)).mean())


JUDGES: dict[str, Callable[[Path], Judge]] = {
    ARCHITECTURE: lambda folder: AttributeJudge(load_classifier(folder)),
}
"""Judge networks by the `architecture.class` of their manifest → a loader of a checkpoint folder."""


def load_judge(folder: Path, manifest: dict[str, Any]) -> Judge:
    """The judge a checkpoint folder holds; CheckpointError when its network is not a known judge."""
    cls = (manifest.get("architecture") or {}).get("class")
    if cls not in JUDGES:
        raise CheckpointError(f"{folder.name}: {cls!r} is not a judge (known: {sorted(JUDGES)})")
    return JUDGES[cls](folder)
