"""One version lifecycle for every model kind: follow → load beside → gate → canary → swap → drain → unload.

`Versions` holds the models of some kinds (`service/kinds.py`) as this process serves them, and follows
the registry between steps (`maintain`, called by the thread that drives the engines):

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

A process that only routes (a gateway in Redis mode, for the kinds its workers serve) builds each
version's spec from its manifest, never loads weights, and follows a new version once a worker's gate
has recorded its verdict. Other threads read `Model` fields, which are replaced whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar, cast

from fewstep.engines.base import Servable
from fewstep.engines.specs import Spec
from fewstep.errors import CheckpointError, FewstepError, NotFound, NotReady, RegistryError
from fewstep.service.gate import Verdict
from fewstep.service.kinds import Context
from fewstep.service.loading import Busy, Loader
from fewstep.service.metrics import Metrics
from fewstep.service.served import Canary, Loaded, Model, Status, share

RETIRE_GRACE_S = 2.0
"""A replaced engine stays open at least this long after it leaves routing (see `_close_drained`)."""
log = logging.getLogger("fewstep.runtime")
E = TypeVar("E", bound=Servable)


def refusal(e: Exception) -> FewstepError:
    """What refuses a version for `e`: a domain error as it is, anything else as a `CheckpointError` naming it."""
    return e if isinstance(e, FewstepError) else CheckpointError(f"load failed: {type(e).__name__}: {e}")


class Versions(Generic[E]):
    """The served models of `kinds`, run here (`run`) or only routed to."""

    def __init__(self, ctx: Context, metrics: Metrics, kinds: Collection[str], run: bool, loader: str) -> None:
        self.ctx, self.metrics, self.run = ctx, metrics, run
        self.settings, self.registry = ctx.settings, ctx.registry
        self.kinds = set(kinds)
        self.models: dict[str, Model] = {}
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.nudged = threading.Event()
        """Set by a push announcement: `maintain` looks at the registry without waiting for the interval."""
        self.loader = Loader(ctx, metrics, loader)
        self._next_look = 0.0
        self._retiring: list[tuple[str, str, Servable, float]] = []
        self._bad_pointers: dict[str, str] = {}
        self._unserved: set[str] = set()
        self._loading: dict[str, tuple[str, Future[Loaded]]] = {}
        self._starting: dict[str, Future[Model | None]] = {}
        """Models pushed after start, loading in the loader thread."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lock = threading.Lock()

    # -- start ------------------------------------------------------------------------------------
    def load(self) -> None:
        """Serve every model of these kinds, in the calling thread; `loaded` is set when done. A model none of
        whose versions loads is kept, reported (`/v1/models`, metrics) and refused per request; the others
        serve regardless."""
        try:
            for name in self.registry.models():
                try:
                    self._place(name, self._first_version(name))
                except Exception:  # a surprise in one model's files stops that model, not the ones after it
                    log.exception("starting %s failed", name)
        except Exception as e:  # the registry itself cannot be listed
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model loading failed")
        finally:
            self._count_ready()
            self._next_look = time.monotonic() + self.settings.watch_interval_s
            self.loaded.set()

    def _place(self, name: str, model: Model | None) -> None:
        """Take a model `_first_version` made into `models` (None: none yet, or not of a kind served here)."""
        if model is None:
            if self.registry.versions(name):
                self._unserved.add(name)  # another process part's kind, or not served by itself
            return
        self.models[name] = model
        self._count_ready()

    def _first_version(self, name: str) -> Model | None:
        """A model of these kinds with its first serving version (or none that loads); None when the model is
        not of these kinds or has no version. It changes only the model it makes (and counts refusals): it may
        run in the loader thread, and `_place` takes its model in."""
        versions = self.registry.versions(name)
        if not versions:
            return None
        promoted = self._pointer(name) or versions[-1]
        kind = self._kind(name, [promoted, *reversed(versions)])
        if kind not in self.kinds:
            return None
        model = Model(name=name, kind=kind, pointer=promoted)
        upto = versions[: versions.index(promoted) + 1] if promoted in versions else versions
        older = [v for v in reversed(upto) if v != promoted]
        passed = [v for v in older if self.loader.passed(model.kind, name, v)]
        if self.run and passed and not self.loader.passed(model.kind, name, promoted):
            # The promoted version is new to the gate (or its last load crashed): serve the newest
            # known-good one first; `maintain` then tries the promoted one beside it.
            order = [*passed, *(v for v in older if v not in passed)]
        else:
            order = [promoted, *older]
        for version in order:
            try:
                loaded = self._candidate(model, version)
            except Exception as e:  # whatever one version does wrong refuses that version, never the start
                self._refused(model, version, refusal(e))
                continue
            self._serve(model, loaded)
            break
        if order[0] != promoted:
            model.pointer = model.serving.version if model.serving else None  # `follow` tries the promoted next
        for v in versions:
            model.statuses.setdefault(v, self._recorded_status(model, v))
        return model

    def _kind(self, name: str, versions: list[str]) -> str | None:
        """The kind of the first of `versions` whose manifest reads (a broken one is refused later, by kind)."""
        for version in versions:
            try:
                kind = self.registry.manifest(name, version).get("kind")
            except FewstepError as e:
                log.warning("cannot read %s:%s manifest: %s", name, version, e)
                continue
            return str(kind)
        return None

    def _candidate(self, model: Model, version: str, wait_for_others: bool = False) -> Loaded:
        """A loaded, warmed and gated version (a spec alone when routing); FewstepError when refused."""
        if not self.run:
            spec, scores = self.loader.spec(model.kind, model.name, version)
            return Loaded(version, None, scores, spec=spec)
        engine, verdict = self.loader.load(model.kind, model.name, version, model.serving, wait_for_others)
        return Loaded(version, engine, verdict.scores or None, verdict.outputs, spec=engine.spec)

    # -- statuses ---------------------------------------------------------------------------------
    def _pointer(self, name: str) -> str | None:
        try:
            version = self.registry.promoted(name)
        except RegistryError as e:
            self._refuse_pointer(name, e)
            return None
        self._bad_pointers.pop(name, None)
        return version

    def _refuse_pointer(self, name: str, e: FewstepError) -> None:
        if self._bad_pointers.get(name) == str(e):
            return  # counted and logged when first seen, not at every look
        self._bad_pointers[name] = str(e)
        self.metrics.model_refused.labels(name).inc()
        log.error("refused the pointer of %s: %s", name, e)

    def _recorded_status(self, model: Model, version: str) -> tuple[Status, str | None]:
        why = self.loader.refused(model.kind, model.name, version)
        return ("refused", why) if why is not None else ("ready", None)

    def _refused(self, model: Model, version: str, e: FewstepError) -> None:
        model.statuses[version] = ("refused", self.loader.public(str(e)))
        self.metrics.model_refused.labels(model.name).inc()
        log.error("refused %s:%s: %s", model.name, version, e)

    def _serve(self, model: Model, loaded: Loaded) -> None:
        """Make `loaded` take every new item of the model; the previous one drains, then closes."""
        old = model.serving
        model.serving = loaded
        model.created = int(self.registry.version_dir(model.name, loaded.version).stat().st_mtime)
        model.statuses[loaded.version] = ("serving", None)
        if old is not None and old.engine is not loaded.engine:
            model.statuses[old.version] = self._recorded_status(model, old.version)
            if old.engine is not None:
                self._retiring.append((model.name, old.version, old.engine, time.monotonic()))
            self.metrics.model_swaps.labels(model.name).inc()
            log.info("%s: version %s serves new items; %s drains", model.name, loaded.version, old.version)
        else:
            s = loaded.spec
            how = "serving" if self.run else "routing"
            log.info("%s %s:%s on %s/%s", how, model.name, loaded.version, s.backend, s.precision)
        self._count_ready()

    def _count_ready(self) -> None:
        models = list(self.models.values())
        for kind in {m.kind for m in models}:
            ready = sum(1 for m in models if m.kind == kind and m.serving is not None)
            self.metrics.models_ready.labels(kind).set(ready)
            self.metrics.models_unavailable.labels(kind).set(sum(1 for m in models if m.kind == kind) - ready)

    # -- following the registry -------------------------------------------------------------------
    def maintain(self, in_use: Collection[object] = ()) -> None:
        """Between steps: follow pointer changes, settle canaries, close drained engines.

        `in_use`: engines that running work still holds (they are not closed yet)."""
        if self.loaded.is_set() and self.load_error is None:
            now = time.monotonic()
            nudged = self.nudged.is_set()
            if nudged or now >= self._next_look:
                self.nudged.clear()
                self._next_look = now + self.settings.watch_interval_s
                for name in self.registry.models():
                    if name in self._unserved:
                        continue
                    try:
                        self.follow(name, recheck=nudged)
                    except Exception:  # the registry is shared input: a surprise there must not stop serving
                        log.exception("following %s failed", name)
            self._collect()
            for model in list(self.models.values()):
                self._settle_canary(model)
        self._close_drained(in_use)

    def follow(self, name: str, recheck: bool = False) -> None:
        """Bring one model in line with its pointer (no-op when it already is).

        `recheck`: also re-read the recorded verdicts of versions shown as ready (another process
        announced one); otherwise only new versions' records are read, to keep each look cheap."""
        model = self.models.get(name)
        if model is None:
            if name in self._starting or not self.registry.versions(name):
                return
            if not self.run:
                self._place(name, self._first_version(name))  # routing reads manifests only
            else:  # a model pushed after start loads in the loader thread, not between the engines' steps
                self._starting[name] = self._pool.submit(self._first_version, name)
            return
        target = self._pointer(name)
        for v in self.registry.versions(name):
            st = model.statuses.get(v)
            if st is None or (recheck and st[0] == "ready"):
                model.statuses[v] = self._recorded_status(model, v)
        if target is None or target == model.pointer or name in self._loading:
            return  # a pointer that moves during a load is followed once that load ends
        serving = model.serving.version if model.serving else None
        if not self.run and target != serving:
            # This process routes and does not judge: it follows once the workers' gate has spoken.
            verdict = self.loader.verdict(model.kind, name, target)
            if verdict is None:
                return
            if not verdict["passed"]:
                model.pointer = target
                model.statuses[target] = ("refused", verdict.get("reason"))
                return
        model.pointer = target
        if target == serving:
            self._drop_canary(model, "the pointer moved back to the serving version")
            return
        if model.canary is not None:
            if model.canary.loaded.version == target:
                return
            self._drop_canary(model, f"the pointer moved on to {target}")
        if not self.run:
            self._adopt(model, self._candidate(model, target))
            return
        # Load, warm up and gate beside the serving version, off the serving thread: work goes on
        # meanwhile (sharing the cores), and `maintain` adopts the result at a step boundary.
        self._loading[name] = (target, self._pool.submit(self._candidate, model, target, True))

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
        if not self.run or self.settings.canary_fraction == 0.0 or model.serving is None:
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

    def watch_forever(self, stop: threading.Event) -> None:
        """Follow the registry until `stop` (a process that runs no engine of these kinds)."""
        self.loaded.wait()
        while not stop.is_set():
            self.maintain()
            self.nudged.wait(self.settings.watch_interval_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for m in self.models.values():
            for loaded in (m.serving, m.canary.loaded if m.canary else None):
                if loaded is not None and loaded.engine is not None:
                    loaded.engine.close()
        for _, _, engine, _ in self._retiring:
            engine.close()

    # -- requests ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Start-up loading finished and the registry could be read: every model that has a working version
        serves. A model without one does not make the process unready (it would take every replica out of
        rotation for one bad push); its requests get 503 naming why (`model`)."""
        return self.loaded.is_set() and self.load_error is None

    def model(self, name: str) -> Model:
        """A served model with a working version; NotReady while loading, NotFound if unknown."""
        if name not in self.models:
            if not self.loaded.is_set():
                raise NotReady("models are still loading")
            raise NotFound(f"model {name!r} not found; GET /v1/models lists the served models")
        m = self.models[name]
        if m.serving is None:
            why = next((f" (version {v}: {r})" for v, (st, r) in reversed(m.statuses.items()) if st == "refused"), "")
            raise NotReady(f"model {name!r} has no version that loads{why}")
        return m

    def spec(self, name: str) -> Spec:
        """The serving version's spec (NotFound / NotReady as `model`)."""
        serving = self.model(name).serving
        assert serving is not None
        return serving.spec

    def engine(self, name: str, key: str | None = None) -> E:
        """The engine new work of `name` starts on: the canary for its share of keys, else the serving one.

        The share is a hash of `key` (a job id, a session id), so all items of a job (and every retry)
        meet one version. Without a key: the serving version. NotReady where this process runs nothing."""
        m = self.model(name)
        loaded = m.serving
        c = m.canary
        if c is not None and key is not None and share(key) < self.settings.canary_fraction:
            loaded = c.loaded
        assert loaded is not None
        if loaded.engine is None:
            raise NotReady(f"model {name!r} is not run by this process")
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
