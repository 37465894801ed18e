"""The version lifecycle of a process that runs the engines: follow → load beside → gate → canary → swap →
drain → unload, one for every model kind.

`Versions` holds the models of some kinds (`service/kinds.py`) as this process serves them (what it shares
with a process that only routes is `service/catalog.py`'s `Catalog`), and follows the registry between
steps (`maintain`, called by the thread that drives the engines):

- **Watch.** Each model's `PROMOTED` pointer is read every `FEWSTEP_WATCH_INTERVAL_S` (a file watch
  that works on any shared volume); with Redis, a push announcement wakes it at once (`nudged`).
- **Load beside, gate.** A new version loads, warms up and is gated in a loader thread
  (`service/loading.py`) while the serving version keeps serving; `maintain` adopts the result, so a
  swap never races a step. A refusal is logged, counted, kept in the registry and shown by
  `/v1/models`; the serving version carries on.
- **Canary.** A version that passes takes new work at once, or first a canary share of it
  (`FEWSTEP_CANARY_FRACTION`) until it has served `FEWSTEP_CANARY_ITEMS` items (images, or streams)
  with an error rate under `FEWSTEP_CANARY_MAX_ERROR_RATE`.
- **Swap, drain, unload.** Work already running finishes on the engine that began it; the old engine
  is closed once nothing in use holds it (`in_use`).
- **Crashes while loading.** Load marks in the registry (`service/loading.py`): a version whose loads
  keep dying is refused, and a version another process is loading is not gated twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar, cast

from fewstep.engines.base import Servable
from fewstep.errors import CheckpointError, FewstepError, NotFound
from fewstep.service.catalog import Catalog, refusal
from fewstep.service.gate import Verdict
from fewstep.service.kinds import Context
from fewstep.service.loading import Busy, Loader
from fewstep.service.metrics import Metrics
from fewstep.service.served import Canary, Loaded, Model, share

RETIRE_GRACE_S = 2.0
"""A replaced engine stays open at least this long after it leaves routing (see `_close_drained`)."""
log = logging.getLogger("fewstep.runtime")
E = TypeVar("E", bound=Servable)


class Versions(Catalog, Generic[E]):
    """The served models of `kinds`, their engines run by this process."""

    def __init__(self, ctx: Context, metrics: Metrics, kinds: Collection[str], loader: str) -> None:
        super().__init__(ctx, metrics, kinds, loader)
        self._retiring: list[tuple[str, str, Servable, float]] = []
        self._loading: dict[str, tuple[str, Future[Loaded]]] = {}
        self._starting: dict[str, Future[Model | None]] = {}
        """Models pushed after start, loading in the loader thread."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lock = threading.Lock()

    @property
    def loading(self) -> bool:
        """Whether a version (or a model pushed after start) is loading in the loader thread now."""
        return bool(self._loading or self._starting)

    # -- start ------------------------------------------------------------------------------------
    def _order(self, model: Model, promoted: str, older: list[str]) -> list[str]:
        passed = [v for v in older if self.loader.passed(model.kind, model.name, v)]
        if passed and not self.loader.passed(model.kind, model.name, promoted):
            # The promoted version is new to the gate (or its last load crashed): serve the newest
            # known-good one first; `maintain` then tries the promoted one beside it.
            return [*passed, *(v for v in older if v not in passed)]
        return [promoted, *older]

    def _candidate(self, model: Model, version: str, wait_for_others: bool = False) -> Loaded:
        """A loaded, warmed and gated version; FewstepError when refused (`Busy`: another process loads it)."""
        engine, verdict = self.loader.load(model.kind, model.name, version, model.serving, wait_for_others)
        return Loaded(version, engine, verdict.scores or None, verdict.outputs, spec=engine.spec)

    # -- following the registry -------------------------------------------------------------------
    def maintain(self, in_use: Collection[object] = ()) -> None:
        """Between steps: follow pointer changes, adopt finished loads, settle canaries, close drained engines.

        `in_use`: engines that running work still holds (they are not closed yet)."""
        if self.ready:
            self._look()
            self._collect()
            for model in list(self.models.values()):
                self._settle_canary(model)
        self._close_drained(in_use)

    def _arrived(self, name: str) -> None:
        # A model pushed after start loads in the loader thread, not between the engines' steps.
        if name not in self._starting and self.registry.versions(name):
            self._starting[name] = self._pool.submit(self._first_version, name)

    def _moved(self, model: Model, target: str) -> None:
        if model.name in self._loading:
            return  # a pointer that moves during a load is followed once that load ends
        model.pointer = target
        serving = model.serving.version if model.serving else None
        if target == serving:
            self._drop_canary(model, "the pointer moved back to the serving version")
            return
        if model.canary is not None:
            if model.canary.loaded.version == target:
                return
            self._drop_canary(model, f"the pointer moved on to {target}")
        # Load, warm up and gate beside the serving version, off the serving thread: work goes on
        # meanwhile (sharing the cores), and `maintain` adopts the result at a step boundary.
        self._loading[model.name] = (target, self._pool.submit(self._candidate, model, target, True))

    def _collect(self) -> None:
        """Adopt (or refuse) the versions whose background load has ended, and take in new models."""
        for name, started in list(self._starting.items()):
            if started.done():
                del self._starting[name]
                try:
                    self._place(name, started.result())
                except Exception:  # looked at again at the next look
                    log.exception("starting %s failed", name)
        for name, (target, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            model = self.models[name]
            try:
                loaded = future.result()
            except Busy:
                model.pointer = None  # look again shortly: by then it has a verdict, or its loader is dead
                self._next_look = min(self._next_look, time.monotonic() + Loader.MARK_TOUCH_S)
                continue
            except NotFound as e:
                model.statuses.pop(target, None)
                self._refuse_pointer(name, e)
                continue
            except FewstepError as e:
                if e.recoverable:  # not the version's fault (the registry or the queue hiccuped): look again
                    model.pointer = None
                    log.warning("loading %s:%s will be retried: %s", name, target, e)
                else:
                    self._refused(model, target, e)
                continue
            except Exception as e:  # a loader bug must not take serving down: the version just does not serve
                log.exception("loading %s:%s failed", name, target)
                self._refused(model, target, refusal(e))
                continue
            if self._pointer(name) != target:
                if loaded.engine is not None:
                    loaded.engine.close()  # superseded while it loaded: the next look follows the new pointer
                model.statuses[target] = self._recorded_status(model, target)
                model.pointer = None
                continue
            self._adopt(model, loaded)

    def _adopt(self, model: Model, loaded: Loaded) -> None:
        """A version that passed the gate: all new work at once, or a canary share first."""
        if self.settings.canary_fraction == 0.0 or model.serving is None:
            self._serve(model, loaded)
            return
        model.canary = Canary(loaded)
        model.statuses[loaded.version] = ("canary", None)
        share = 100 * self.settings.canary_fraction
        log.info("%s: version %s is a canary for %.0f%% of new work", model.name, loaded.version, share)

    def _settle_canary(self, model: Model) -> None:
        c = model.canary
        if c is None:
            return
        seen = c.ok + c.failed
        if seen < self.settings.canary_items:
            return
        rate = c.failed / seen
        model.canary = None
        if rate > self.settings.canary_max_error_rate:
            why = (
                f"canary error rate {rate:.3f} ({c.failed} of {seen} items failed) is above "
                f"`canary_max_error_rate` = {self.settings.canary_max_error_rate}"
            )
            self.loader.record(model.kind, model.name, c.loaded.version, Verdict(False, why))
            self._refused(model, c.loaded.version, CheckpointError(why))
            self._retire(model, c.loaded)
            return
        log.info("%s: canary %s served %d items, %d failed: promoted", model.name, c.loaded.version, seen, c.failed)
        self._serve(model, c.loaded)

    def _drop_canary(self, model: Model, why: str) -> None:
        c = model.canary
        if c is None:
            return
        model.canary = None
        model.statuses[c.loaded.version] = self._recorded_status(model, c.loaded.version)
        self._retire(model, c.loaded)
        log.info("%s: canary %s withdrawn (%s)", model.name, c.loaded.version, why)

    def _retire(self, model: Model, loaded: Loaded) -> None:
        if loaded.engine is not None:
            self._retiring.append((model.name, loaded.version, loaded.engine, time.monotonic()))

    def _close_drained(self, in_use: Collection[object]) -> None:
        """Close replaced engines that no running work holds and that left routing at least `RETIRE_GRACE_S`
        ago: another worker thread may have been handed one just before the swap and not begun on it yet."""
        busy = {id(e) for e in in_use}
        keep = []
        now = time.monotonic()
        for name, version, engine, since in self._retiring:
            if id(engine) in busy or now - since < RETIRE_GRACE_S:
                keep.append((name, version, engine, since))
                continue
            engine.close()
            log.info("%s: version %s drained and unloaded", name, version)
        self._retiring = keep

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for m in self.models.values():
            for loaded in (m.serving, m.canary.loaded if m.canary else None):
                if loaded is not None and loaded.engine is not None:
                    loaded.engine.close()
        for _, _, engine, _ in self._retiring:
            engine.close()

    # -- requests ---------------------------------------------------------------------------------
    def engine(self, name: str, key: str | None = None) -> E:
        """The engine new work of `name` starts on: the canary for its share of keys, else the serving one.

        The share is a hash of `key` (a job id, a session id), so all items of a job (and every retry)
        meet one version. Without a key: the serving version."""
        m = self.model(name)
        loaded = m.serving
        c = m.canary
        if c is not None and key is not None and share(key) < self.settings.canary_fraction:
            loaded = c.loaded
        assert loaded is not None and loaded.engine is not None
        return cast(E, loaded.engine)  # the kinds this instance serves make engines of one protocol

    def record(self, name: str, engine: object, ok: bool | None) -> None:
        """Count finished work against a canary: `ok` True or False, None when it says nothing of the
        engine (cancelled, refused as invalid)."""
        m = self.models.get(name)
        c = m.canary if m is not None else None
        if c is None or c.loaded.engine is not engine or ok is None:
            return
        with self._lock:
            if ok:
                c.ok += 1
            else:
                c.failed += 1
