"""Loading one registry version beside the serving one: load marks, warm-up, the gate, recorded verdicts.

A load keeps a mark in the registry fresh until it ends. A process that dies mid-load leaves a mark
that goes stale; a version with `FEWSTEP_MAX_LOAD_ATTEMPTS` stale marks is refused. While another
process's mark is fresh, a process waits for that load's verdict (`Busy`) instead of gating the same
version at the same time. Verdicts are kept in the registry per runtime (a version may serve on one
backend and not yet on another), so every process, and every restart, agrees without judging again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from fewstep.engines.base import Servable
from fewstep.engines.specs import Spec
from fewstep.errors import CheckpointError, FewstepError, RegistryError
from fewstep.models.registry import Registry
from fewstep.service.gate import Gate, Reference, Verdict
from fewstep.service.kinds import KINDS, Context, Version
from fewstep.service.metrics import Metrics
from fewstep.service.watch import announce

log = logging.getLogger("fewstep.runtime")


class Busy(Exception):
    """Another process is loading this version now."""


class Loader:
    """Loads, warms and gates versions of any kind for one process (`name`: its load marks' owner)."""

    MARK_TOUCH_S = 1.0
    MARK_STALE_S = 5.0
    """A load mark untouched this long belongs to a process that died while loading."""

    def __init__(self, ctx: Context, metrics: Metrics, name: str) -> None:
        self.ctx, self.metrics, self.name = ctx, metrics, name
        self.registry: Registry = ctx.registry
        self.gate = Gate(ctx.registry, ctx.settings)

    # -- recorded verdicts -------------------------------------------------------------------------
    def runtime(self, kind: str) -> str:
        return KINDS[kind].runtime(self.ctx.settings)

    def verdict(self, kind: str, name: str, version: str) -> dict[str, Any] | None:
        return self.registry.verdict(name, version, self.runtime(kind))

    def passed(self, kind: str, name: str, version: str) -> bool:
        v = self.verdict(kind, name, version)
        return bool(v and v["passed"])

    def refused(self, kind: str, name: str, version: str) -> str | None:
        return self.registry.refused(name, version, self.runtime(kind))

    def record(self, kind: str, name: str, version: str, verdict: Verdict) -> None:
        runtime = self.runtime(kind)
        try:
            self.registry.record_verdict(name, version, runtime, verdict.record(runtime))
        except (OSError, RegistryError) as e:  # a read-only registry still gates, it just cannot remember
            log.warning("cannot record the verdict on %s:%s: %s", name, version, e)
            return
        announce(self.ctx.settings, name, version, "passed" if verdict.passed else "refused")  # gateways report it

    def public(self, message: str) -> str:
        """A message without the registry's place on disk: clients see reasons, not server paths."""
        return message.replace(f"{self.registry.root}/", "")

    # -- versions ----------------------------------------------------------------------------------
    def _version(self, name: str, version: str, kind: str) -> Version:
        if (why := self.refused(kind, name, version)) is not None:
            raise CheckpointError(why)
        manifest = self.registry.validate(name, version)
        return Version(name, version, self.registry.version_dir(name, version), manifest)

    def spec(self, kind: str, name: str, version: str) -> tuple[Spec, dict[str, float] | None]:
        """A version's spec from its manifest, and its recorded scores (routing: nothing is loaded)."""
        v = self._version(name, version, kind)
        recorded = self.verdict(kind, name, version)
        return KINDS[kind].spec(self.ctx, v), Verdict.scores_of(recorded) if recorded else None

    def load(
        self, kind: str, name: str, version: str, serving: Reference | None, wait_for_others: bool
    ) -> tuple[Servable, Verdict]:
        """A loaded, warmed and gated engine of `version` and its verdict, or the FewstepError that refuses
        it. `wait_for_others`: raise `Busy` instead of loading while another process loads it.

        Whatever the version makes go wrong (its files, its configs, its warm-up, its gate: any exception,
        not only a `CheckpointError`) refuses it, recorded; only a recoverable `FewstepError` (the registry or
        the queue hiccuped) is left to be tried again."""
        k = KINDS[kind]
        v = self._version(name, version, kind)
        try:
            # Not recorded: what building refuses may be the registry's state, not the version's (a first-frame
            # image model pushed later), and building reads no weights, so it is cheap to try again.
            engine = k.engine(self.ctx, v)
        except FewstepError:
            raise
        except Exception as e:
            raise CheckpointError(self.public(f"load failed: {type(e).__name__}: {e}")) from e
        recorded = self.verdict(kind, name, version)
        if recorded is None:
            dead, live = self.registry.load_marks(name, version, self.MARK_STALE_S)
            if dead >= self.ctx.settings.max_load_attempts:
                why = f"{dead} loads of it never finished (their process died while loading)"
                self.record(kind, name, version, Verdict(False, why))
                raise CheckpointError(why)
            if live and wait_for_others:
                # Another process is loading it now: its verdict (or its death) decides, not a race.
                raise Busy(f"{live} other loads of {name}:{version} in progress")
        mark = self.registry.begin_load(name, version, self.name)
        fresh = _Freshener(self.registry, mark, self.MARK_TOUCH_S)
        t0 = time.perf_counter()
        try:
            try:
                engine.load()
                engine.warmup()
                if recorded is not None:
                    # Judged by another process: take its verdict. A model with no judge still needs its own
                    # outputs on the probes, made now, before it serves, as its successors' reference.
                    unjudged = self.gate.judge(v.manifest) is None
                    made = self.gate.outputs(k, engine, v.manifest) if unjudged else None
                    scores = Verdict.scores_of(recorded) or {}
                    verdict = Verdict(True, None, recorded.get("metrics") or {}, scores, made)
                else:
                    verdict = self.gate.check(k, engine, v.manifest, serving)
            except Exception as e:
                if isinstance(e, FewstepError) and e.recoverable:
                    raise
                why = self.public(str(e) if isinstance(e, CheckpointError) else f"load failed: {type(e).__name__}: {e}")
                self.record(kind, name, version, Verdict(False, why))
                raise CheckpointError(why) from e
            if recorded is None:
                self.record(kind, name, version, verdict)
                log.info("gate %s %s:%s %s", "passed" if verdict.passed else "refused", name, version, verdict.metrics)
            if not verdict.passed:
                raise CheckpointError(verdict.reason or "refused by the gate")
        except BaseException:
            engine.close()
            raise
        finally:
            fresh.stop()
            self.registry.end_load(mark)
        self.metrics.model_load_seconds.labels(name).observe(time.perf_counter() - t0)
        return engine, verdict


class _Freshener:
    """Touches a load mark every `every` seconds until stopped, so that others see the load is alive."""

    def __init__(self, registry: Registry, mark: Path, every: float) -> None:
        self._done = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, args=(registry, mark), name="load-mark", daemon=True)
        self._thread.start()

    def _run(self, registry: Registry, mark: Path) -> None:
        while not self._done.wait(self._every):
            try:
                registry.touch_load(mark)
            except OSError:
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
