"""The serving gate: what a loaded registry version must pass before it takes a single request.

Loading already refuses most bad pushes (`Registry.validate` and the backends): files that do not
match their manifest hashes, truncated files, pickle-format files (refused unread), names that escape
the registry, and weights whose shapes do not fit the manifest's architecture. Warm-up refuses a
network whose outputs are not finite. The gate adds what needs the network to run, the same for every
model kind (`service/kinds.py` says how a kind makes its probe outputs):

1. the probe set (the manifest's `evaluation.probes`, else the kind's) must run and give finite outputs;
2. with a judge (the manifest's `evaluation.judge`, a registry model), every accuracy of the judge must be
   within `gate_tolerance` of the serving version's, and its Fréchet distance to real data (where the judge
   gives one: the continuous signal a saturated accuracy lacks) at most `gate_max_frechet_rise` above it;
3. without one (a user's own model, or a judge the registry lacks), the outputs must agree with the
   serving version's on the same probes: PSNR at least `gate_min_agreement_db`.

The probes are fixed (prompts, seeds, steps), so a version gets the same verdict in every process;
verdicts are kept in the registry (`Registry.record_verdict`) under the kind's runtime.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fewstep.engines.base import Servable
from fewstep.errors import FewstepError
from fewstep.evaluation.judges import FRECHET, Judge, load_judge
from fewstep.evaluation.metrics import psnr
from fewstep.evaluation.probes import ProbeSet
from fewstep.models.registry import Registry
from fewstep.service.kinds import Deadline, Kind
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.gate")


Outputs = tuple[ProbeSet, np.ndarray]
"""A probe set and what a version made of it."""


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of one version. `scores` (the judge's) and `outputs` (what it made of the probes)
    are the next version's reference; only the scores are recorded."""

    passed: bool
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    outputs: Outputs | None = field(default=None, repr=False)

    def record(self, runtime: str) -> dict[str, Any]:
        """As kept in the registry: the scores flat among the metrics, and which keys they are."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "metrics": {**self.metrics, **self.scores, "scored": sorted(self.scores)},
            "runtime": runtime,
            "checked_at": round(time.time(), 3),
        }

    @staticmethod
    def scores_of(recorded: dict[str, Any]) -> dict[str, float] | None:
        """The judge's scores in a recorded verdict (None when it had no judge)."""
        metrics = recorded.get("metrics") or {}
        keys = metrics.get("scored", [k for k in metrics if k.endswith("_accuracy")])
        scores = {k: float(metrics[k]) for k in keys if isinstance(metrics.get(k), int | float)}
        return scores or None


@dataclass
class Reference:
    """The serving version, as the gate compares a candidate with it: its judge's scores and its outputs on
    the probes, where known (else made by its engine when first needed)."""

    version: str
    engine: Servable | None
    scores: dict[str, float] | None
    outputs: Outputs | None = field(default=None, repr=False)


class Gate:
    """Runs a kind's probes on a loaded engine and judges them against the serving version."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings
        self._judges: dict[str, Judge | None] = {}
        self._lock = threading.Lock()

    def judge(self, manifest: dict[str, Any]) -> Judge | None:
        """The judge a manifest names, read once per process from its promoted version; None when it names
        none or the registry lacks it (then agreement with the serving version is what is checked)."""
        name = (manifest.get("evaluation") or {}).get("judge")
        if not isinstance(name, str) or not name:
            return None
        with self._lock:
            if name not in self._judges:
                self._judges[name] = self._load(name)
            return self._judges[name]

    def _load(self, name: str) -> Judge | None:
        try:
            version = self.registry.promoted(name)
            if version is None:
                raise FewstepError(f"no promoted version of {name!r} in the registry")
            judged = self.registry.validate(name, version)
            return load_judge(self.registry.version_dir(name, version), judged)
        except FewstepError as e:
            log.warning("gate: judge %s unavailable (%s); versions are checked against the serving one", name, e)
            return None

    def check(self, kind: Kind[Any], engine: Servable, manifest: dict[str, Any], serving: Reference | None) -> Verdict:
        """Judge a loaded, warmed engine against `serving` (None for a model's first version)."""
        try:
            probes = kind.probes(self.settings, manifest)
        except FewstepError as e:
            return Verdict(False, str(e))
        if probes is None:
            return Verdict(True, None, {"probes": 0})
        deadline = Deadline.after(self.settings.gate_timeout_s)
        try:
            out = kind.render(engine, probes, deadline)
            if not np.isfinite(out).all():
                raise FewstepError("probe outputs are not finite")
        except FewstepError as e:
            return Verdict(False, f"probe failed: {e}")
        made = (probes, out)
        n, steps = len(probes), engine.spec.default_steps
        metrics: dict[str, Any] = {"probes": n, "steps": steps}
        if probes.frames > 1:
            metrics["frames"] = probes.frames
        judge = self.judge(manifest)
        if judge is not None:
            scores = judge.score(probes, out)
            reference = serving.scores if serving is not None else None
            if (
                serving is not None
                and reference is None
                and (theirs := self._outputs(kind, serving, probes, deadline)) is not None
            ):
                reference = serving.scores = judge.score(probes, theirs)
            if serving is not None:
                metrics["against"] = {"version": serving.version, **(reference or {})}
            if serving is not None and reference is not None and (why := self._regression(scores, reference, n)):
                return Verdict(False, f"quality regression: {why} version {serving.version}'s", metrics, scores)
            return Verdict(True, None, metrics, scores, made)
        if serving is not None and (theirs := self._outputs(kind, serving, probes, deadline)) is not None:
            db = psnr(out, theirs, peak=2.0)
            least = self.settings.gate_min_agreement_db
            metrics["against"] = {"version": serving.version, "agreement_psnr_db": round(db, 2)}
            if db < least:
                return Verdict(
                    False,
                    f"outputs disagree with version {serving.version}'s on {n} probes: PSNR {db:.1f} dB is below "
                    f"`gate_min_agreement_db` = {least}",
                    metrics,
                )
        return Verdict(True, None, metrics, {}, made)

    def _regression(self, scores: dict[str, float], reference: dict[str, float], n: int) -> str | None:
        """Why `scores` fall short of the serving version's `reference` (accuracies first), or None."""
        tol, rise = self.settings.gate_tolerance, self.settings.gate_max_frechet_rise
        for key, value in sorted(scores.items(), key=lambda kv: kv[0] == FRECHET):
            if key not in reference:
                continue
            theirs = reference[key]
            if key == FRECHET and value > theirs * (1.0 + rise):
                return (
                    f"Fréchet distance to real data {value:.2f} on {n} probes is more than `gate_max_frechet_rise` = "
                    f"{rise} above"
                )
            if key != FRECHET and value < theirs - tol:
                return f"{key.replace('_', ' ')} {value:.3f} on {n} probes is more than `gate_tolerance` = {tol} below"
        return None

    def outputs(self, kind: Kind[Any], engine: Servable, manifest: dict[str, Any]) -> Outputs | None:
        """What a loaded engine makes of its probe set, for a version whose verdict was recorded elsewhere
        (None when its gate is off or a probe fails): the reference its successors are compared with."""
        try:
            probes = kind.probes(self.settings, manifest)
            deadline = Deadline.after(self.settings.gate_timeout_s)
            return None if probes is None else (probes, kind.render(engine, probes, deadline))
        except FewstepError as e:
            log.warning("gate: no reference outputs of this version (%s)", e)
            return None

    @staticmethod
    def _outputs(kind: Kind[Any], serving: Reference, probes: ProbeSet, deadline: Deadline) -> np.ndarray | None:
        """The serving version's outputs on `probes`: kept from its own gate, or made by its engine now."""
        if serving.outputs is not None and serving.outputs[0] == probes:
            return serving.outputs[1]
        if serving.engine is None:
            return None
        try:
            serving.outputs = (probes, kind.render(serving.engine, probes, deadline))
        except FewstepError as e:  # a stream engine whose sessions are all taken, say
            deadline.check()  # but out of time is the candidate's refusal, not a comparison skipped
            log.warning("gate: the serving version %s cannot make the probes now (%s)", serving.version, e)
            return None
        return serving.outputs[1]
