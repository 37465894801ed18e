"""The serving gate: what a registry version must pass before it takes a single request.

Loading already refuses most bad pushes (`Registry.validate` and the backend): files that do
not match their manifest hashes, truncated files, pickle-format files (refused unread), names
that escape the registry, and weights whose shapes do not fit the manifest's architecture.
Warm-up refuses a network whose outputs are not finite. The gate adds the two checks that need
the network to run: fixed probes must give finite images, and their joint attribute accuracy
(shape and colour, judged by the registry's attribute classifier) must be within
`FEWSTEP_GATE_TOLERANCE` of the version serving now.

The probes are fixed (prompts, seeds, steps), so the same version gets the same verdict in
every process; verdicts are kept in the registry (`Registry.record_verdict`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.errors import FewstepError
from fewstep.models.registry import Registry
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.gate")
PROBE_SEED = 9_100_000
"""First seed of the probes (far from the trainer's evaluation seeds)."""


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of one version."""

    passed: bool
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def record(self, flavour: str) -> dict[str, Any]:
        """As kept in the registry."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "metrics": self.metrics,
            "flavour": flavour,
            "checked_at": round(time.time(), 3),
        }


def probe_items(seeds_per_prompt: int, steps: int) -> tuple[list[ImageItem], np.ndarray, np.ndarray]:
    """One held-out prompt per (colour, shape), `seeds_per_prompt` seeds each, and their labels."""
    from fewstep.trainer import shapes

    first: dict[tuple[str, str], str] = {}
    for prompt, colour, shape in shapes.eval_prompts():
        first.setdefault((colour, shape), prompt)
    items, ys, yc = [], [], []
    for k, ((colour, shape), prompt) in enumerate(sorted(first.items())):
        for j in range(seeds_per_prompt):
            items.append(ImageItem(prompt, seed=PROBE_SEED + k * seeds_per_prompt + j, steps=steps))
            ys.append(shapes.SHAPES.index(shape))
            yc.append(shapes.COLOUR_NAMES.index(colour))
    return items, np.array(ys), np.array(yc)


class RegistryJudge:
    """A judging model read once from the registry's promoted version of `name`, or None when the registry
    has none (or `name` is empty): then the gate checks only that its probes run and are finite."""

    def __init__(self, registry: Registry, name: str, load: Callable[[Path], Any], what: str) -> None:
        self.registry, self.name, self.load, self.what = registry, name, load, what
        self._model: Any = None
        self._missing: str | None = None

    def get(self) -> Any:
        if self._model is not None or self._missing is not None:
            return self._model
        try:
            version = self.registry.promoted(self.name) if self.name else None
            if version is None:
                raise FewstepError(f"no promoted version of {self.name!r} in the registry" if self.name else "disabled")
            self.registry.validate(self.name, version)
            self._model = self.load(self.registry.version_dir(self.name, version))
        except FewstepError as e:
            self._missing = str(e)
            log.warning("gate: %s is not checked (%s); probes are still run", self.what, e)
        return self._model


def _load_classifier(folder: Path) -> Any:
    from fewstep.trainer.image import load_classifier

    return load_classifier(folder)


class Gate:
    """Runs the probes on a loaded engine and judges it against the serving version's accuracy."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._judge = RegistryJudge(registry, settings.gate_judge, _load_classifier, "attribute accuracy")

    def _classifier(self) -> Any:
        """The attribute classifier from the registry (`FEWSTEP_GATE_JUDGE`), or None (quality unchecked)."""
        return self._judge.get()

    def accuracy(self, engine: ImageEngine) -> tuple[float | None, int]:
        """Joint accuracy of `engine` on the probes (None without a judge), and the number of probes.

        Raises FewstepError when a probe fails (a non-finite image fails inside the engine).
        """
        items, ys, yc = probe_items(self.settings.gate_probe_seeds, engine.schedule.default_steps)
        results = engine.run(items)
        images = []
        for item, r in zip(items, results, strict=True):
            if not isinstance(r, ImageResult):
                raise FewstepError(f"probe {item.prompt!r} seed {item.seed} failed: {r}")
            images.append(r.pixels)
        judge = self._classifier()
        if judge is None:
            return None, len(items)
        from fewstep.trainer.classifier import judge as classify

        x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        s, c, _ = classify(judge, x)
        return float(((s == ys) & (c == yc)).mean()), len(items)

    def check(self, engine: ImageEngine, reference: float | None, against: str | None) -> Verdict:
        """Judge a loaded, warmed engine; `reference` is the serving version's probe accuracy."""
        try:
            acc, n = self.accuracy(engine)
        except FewstepError as e:
            return Verdict(False, f"probe failed: {e}")
        metrics: dict[str, Any] = {"joint_accuracy": acc, "probes": n, "steps": engine.schedule.default_steps}
        if against is not None:
            metrics["against"] = {"version": against, "joint_accuracy": reference}
        tol = self.settings.gate_tolerance
        if acc is not None and reference is not None and acc < reference - tol:
            return Verdict(
                False,
                f"quality regression: joint accuracy {acc:.3f} on {n} probes is more than "
                f"`gate_tolerance` = {tol} below version {against}'s {reference:.3f}",
                metrics,
            )
        return Verdict(True, None, metrics)
