"""The model runtime: registry → engines, version changes while serving, and what `/v1/models` reports.

Models load in a background thread so the process answers `/healthz` at once. After that the
serving thread calls `maintain()` between step boundaries, which follows the registry:

- **Watch.** Each model's `PROMOTED` pointer is read every `FEWSTEP_WATCH_INTERVAL_S` (a file
  watch that works on any shared volume); with Redis, a push announcement wakes it at once.
- **Gate.** A new version loads *beside* the serving one and must pass the serving gate
  (service/gate.py: hashes, safetensors only, shapes, finite probes, probe accuracy within
  tolerance of the serving version). A refusal is logged, counted, kept in the registry and
  shown by `/v1/models`; the serving version carries on.
- **Swap.** A version that passes takes new items at once, or first a canary share of them
  (`FEWSTEP_CANARY_FRACTION`) until it has served `FEWSTEP_CANARY_ITEMS` with an error rate
  under `FEWSTEP_CANARY_MAX_ERROR_RATE`. Items already running finish on the engine that began
  them (the scheduler binds slots to engines); the old engine is closed once none uses it.
- **Crashes while loading.** A load keeps a mark in the registry fresh until it ends. A process
  that dies mid-load leaves a mark that goes stale; at start a process serves the newest version
  the gate passed first and only then tries the new one, and a version with
  `FEWSTEP_MAX_LOAD_ATTEMPTS` stale marks is refused. While another process's mark is fresh, a
  process waits for that load's verdict instead of gating the same version at the same time.

A new version loads, warms up and is gated in a loader thread while the serving thread keeps
stepping (both share the cores for those seconds: measured in bench/hotswap.py); the serving
thread adopts the result in `maintain`, so a swap never races a step. Other threads read the
`Served` fields, which are replaced whole. The first load at start runs in the serving thread.

A gateway that only queues work (Redis mode) reads manifests only and takes the gate's
verdicts from the registry: it never loads weights.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.engines.base import Outcome
from fewstep.engines.image import ImageEngine
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, NotFound, NotReady, RegistryError
from fewstep.models.registry import Registry
from fewstep.models.text import TextEncoder
from fewstep.service.gate import Gate, Verdict
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.watch import announce

log = logging.getLogger("fewstep.runtime")
SERVED_KINDS = ("image",)
MARK_TOUCH_S = 1.0
MARK_STALE_S = 5.0
"""A load mark untouched this long belongs to a process that died while loading."""


@dataclass
class Canary:
    """A gated version taking a share of new items until its live error rate has been seen."""

    engine: ImageEngine
    version: str
    accuracy: float | None
    ok: int = 0
    failed: int = 0


@dataclass
class Served:
    """One model as this process serves it."""

    name: str
    kind: str
    engine: ImageEngine | None = None
    version: str | None = None
    created: int = 0
    accuracy: float | None = None
    """The serving version's probe accuracy: the reference the next version is gated against."""
    canary: Canary | None = None
    statuses: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    pointer: str | None = None
    """The `PROMOTED` version this process last acted on."""


class Runtime:
    """Owns the text encoder and the engines. `run_engines=False`: manifests only, nothing runs here."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        run_engines: bool = True,
        on_loaded: Callable[[], None] | None = None,
        loader: str = "gateway",
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.run_engines = run_engines
        self.on_loaded = on_loaded
        self.loader = loader
        self.registry = Registry(settings.registry)
        self.flavour = f"{settings.backend}-{settings.precision}"
        self.gate = Gate(self.registry, settings)
        self.models: dict[str, Served] = {}
        self.encoder: TextEncoder | None = None
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.nudged = threading.Event()
        """Set by a push announcement: `maintain` looks at the registry without waiting for the interval."""
        self._next_look = 0.0
        self._retiring: list[tuple[str, str, ImageEngine]] = []
        self._bad_pointers: dict[str, str] = {}
        self._unserved: set[str] = set()
        self._loading: dict[str, tuple[str, Future[tuple[ImageEngine, float | None]]]] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading in the background; `ready` turns true when done."""
        self._thread = threading.Thread(target=self._load_all, name="runtime-load", daemon=True)
        self._thread.start()

    def _load_all(self) -> None:
        try:
            import torch

            torch.set_num_threads(self.settings.threads)
            added = self.registry.seed_from(self.settings.checkpoints)
            for model, version in added:
                log.info("registry seeded with %s:%s from %s", model, version, self.settings.checkpoints)
            self.encoder = TextEncoder() if self.run_engines else None  # validation needs no text encoder
            for name in self.registry.models():
                self._start_model(name)
            self._count_ready()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model loading failed")
        finally:
            self._next_look = time.monotonic() + self.settings.watch_interval_s
            self.loaded.set()
        if self.on_loaded is not None and self.load_error is None:
            self.on_loaded()  # may run for the life of the process (the gateway's first worker)

    def load(self) -> None:
        """Load in the calling thread (a worker process has nothing to answer meanwhile)."""
        self._load_all()

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

    def _start_model(self, name: str) -> None:
        versions = self.registry.versions(name)
        if not versions:
            return
        promoted = self._pointer(name) or versions[-1]
        try:
            kind = self.registry.manifest(name, promoted).get("kind")
        except FewstepError as e:
            kind = "image"
            log.warning("cannot read %s:%s manifest: %s", name, promoted, e)
        if kind not in SERVED_KINDS:
            self._unserved.add(name)  # a judge or a teacher: read by others, never served by itself
            return
        served = Served(name=name, kind=str(kind), pointer=promoted)
        self.models[name] = served
        upto = versions[: versions.index(promoted) + 1] if promoted in versions else versions
        older = [v for v in reversed(upto) if v != promoted]
        passed = [v for v in older if self._passed(name, v)]
        if self.run_engines and passed and not self._passed(name, promoted):
            # The promoted version is new to the gate (or its last load crashed): serve the newest
            # known-good one first; `maintain` then tries the promoted one beside it.
            order = [*passed, *(v for v in older if v not in passed)]
        else:
            order = [promoted, *older]
        for version in order:
            try:
                engine, accuracy = self._candidate(served, version)
            except FewstepError as e:
                self._refused(served, version, e)
                continue
            self._serve(served, version, engine, accuracy)
            break
        if order[0] != promoted:
            served.pointer = served.version  # so that `follow` tries the promoted version next
        for v in versions:
            served.statuses.setdefault(v, self._recorded_status(name, v))

    def _passed(self, name: str, version: str) -> bool:
        v = self.registry.verdict(name, version, self.flavour)
        return bool(v and v["passed"])

    def _recorded_status(self, name: str, version: str) -> tuple[str, str | None]:
        why = self.registry.refused(name, version, self.flavour)
        return ("refused", why) if why is not None else ("ready", None)

    def _candidate(
        self, served: Served, version: str, wait_for_others: bool = False
    ) -> tuple[ImageEngine, float | None]:
        """A loaded, warmed and gated engine of `version`, or the FewstepError that refuses it.

        `wait_for_others`: raise `_Busy` instead of loading while another process loads it.
        """
        name = served.name
        if (why := self.registry.refused(name, version, self.flavour)) is not None:
            raise CheckpointError(why)
        manifest = self.registry.validate(name, version)
        engine = ImageEngine(
            self.registry.version_dir(name, version),
            self.encoder,
            self.settings.backend,
            self.settings.precision,
            version=version,
            teacher_folder=self._teacher_folder(name, manifest),
        )
        if not self.run_engines:
            return engine, None
        recorded = self.registry.verdict(name, version, self.flavour)
        if recorded is None:
            dead, live = self.registry.load_marks(name, version, MARK_STALE_S)
            if dead >= self.settings.max_load_attempts:
                why = f"{dead} loads of it never finished (their process died while loading)"
                self._record(name, version, Verdict(False, why))
                raise CheckpointError(why)
            if live and wait_for_others:
                # Another process is loading it now: its verdict (or its death) decides, not a race.
                raise _Busy(f"{live} other loads of {name}:{version} in progress")
        mark = self.registry.begin_load(name, version, self.loader)
        fresh = _Freshener(self.registry, mark)
        t0 = time.perf_counter()
        try:
            try:
                engine.load()
                engine.warmup()
            except CheckpointError as e:
                self._record(name, version, Verdict(False, str(e).replace(f"{self.registry.root}/", "")))
                raise
            if recorded is not None:
                verdict = Verdict(True, None, recorded.get("metrics") or {})
            else:
                reference, against = served.accuracy, served.version
                if served.engine is not None and reference is None:
                    reference, _ = self.gate.accuracy(served.engine)
                    served.accuracy = reference
                verdict = self.gate.check(engine, reference, against)
                self._record(name, version, verdict)
            if not verdict.passed:
                raise CheckpointError(verdict.reason or "refused by the gate")
        except BaseException:
            engine.close()
            raise
        finally:
            fresh.stop()
            self.registry.end_load(mark)
        self.metrics.model_load_seconds.labels(name).observe(time.perf_counter() - t0)
        return engine, verdict.metrics.get("joint_accuracy")

    def _record(self, name: str, version: str, verdict: Verdict) -> None:
        try:
            self.registry.record_verdict(name, version, self.flavour, verdict.record(self.flavour))
        except (OSError, RegistryError) as e:  # a read-only registry still gates, it just cannot remember
            log.warning("cannot record the verdict on %s:%s: %s", name, version, e)
            return
        announce(self.settings, name, version, "passed" if verdict.passed else "refused")  # gateways report it

    def _refused(self, served: Served, version: str, e: FewstepError) -> None:
        # Clients see the reason, not the server's filesystem layout.
        served.statuses[version] = ("refused", str(e).replace(f"{self.registry.root}/", ""))
        self.metrics.model_refused.labels(served.name).inc()
        log.error("refused %s:%s: %s", served.name, version, e)

    def _serve(self, served: Served, version: str, engine: ImageEngine, accuracy: float | None) -> None:
        """Make `engine` take every new item of the model; the previous one drains, then closes."""
        old, old_version = served.engine, served.version
        served.engine, served.version, served.accuracy = engine, version, accuracy
        served.created = int(self.registry.version_dir(served.name, version).stat().st_mtime)
        served.statuses[version] = ("serving", None)
        if old is not None and old is not engine:
            assert old_version is not None
            served.statuses[old_version] = self._recorded_status(served.name, old_version)
            self._retiring.append((served.name, old_version, old))
            self.metrics.model_swaps.labels(served.name).inc()
            log.info("%s: version %s serves new items; %s drains", served.name, version, old_version)
        else:
            log.info(
                "%s %s:%s on %s/%s",
                "serving" if self.run_engines else "routing",
                served.name,
                version,
                self.settings.backend,
                self.settings.precision,
            )
        self._count_ready()

    def _count_ready(self) -> None:
        self.metrics.models_ready.set(sum(1 for s in self.models.values() if s.engine is not None))

    # -- following the registry ------------------------------------------------------------
    def maintain(self, in_use: Collection[object] = ()) -> None:
        """Between steps: follow pointer changes, settle canaries, close drained engines.

        `in_use`: engines that running items still hold (they are not closed yet).
        """
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
            for served in list(self.models.values()):
                self._settle_canary(served)
        self._close_drained(in_use)

    def follow(self, name: str, recheck: bool = False) -> None:
        """Bring one model in line with its pointer (no-op when it already is).

        `recheck`: also re-read the recorded verdicts of versions shown as ready (another process
        announced one); otherwise only new versions' records are read, to keep each look cheap.
        """
        served = self.models.get(name)
        if served is None:
            if self.registry.versions(name):
                self._start_model(name)  # a model pushed after start
            return
        target = self._pointer(name)
        for v in self.registry.versions(name):
            st = served.statuses.get(v)
            if st is None or (recheck and st[0] == "ready"):
                served.statuses[v] = self._recorded_status(name, v)
        if target is None or target == served.pointer or name in self._loading:
            return  # a pointer that moves during a load is followed once that load ends
        if not self.run_engines and target != served.version:
            # This process routes and does not judge: it follows once the workers' gate has spoken.
            verdict = self.registry.verdict(name, target, self.flavour)
            if verdict is None:
                return
            if not verdict["passed"]:
                served.pointer = target
                served.statuses[target] = ("refused", verdict.get("reason"))
                return
        served.pointer = target
        if target == served.version:
            self._drop_canary(served, "the pointer moved back to the serving version")
            return
        if served.canary is not None:
            if served.canary.version == target:
                return
            self._drop_canary(served, f"the pointer moved on to {target}")
        if not self.run_engines:
            self._adopt(served, target, *self._candidate(served, target))
            return
        # Load, warm up and gate beside the serving version, off the serving thread: steps go on
        # meanwhile (sharing the cores), and `maintain` adopts the result at a step boundary.
        self._loading[name] = (target, self._loader.submit(self._candidate, served, target, True))

    def _collect(self) -> None:
        """Adopt (or refuse) the versions whose background load has ended."""
        for name, (target, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            served = self.models[name]
            try:
                engine, accuracy = future.result()
            except _Busy:
                served.pointer = None  # look again shortly: by then it has a verdict, or its loader is dead
                self._next_look = min(self._next_look, time.monotonic() + MARK_TOUCH_S)
                continue
            except NotFound as e:
                served.statuses.pop(target, None)
                self._refuse_pointer(name, e)
                continue
            except FewstepError as e:
                self._refused(served, target, e)
                continue
            except Exception as e:  # a loader bug must not take serving down: the version just does not serve
                log.exception("loading %s:%s failed", name, target)
                self._refused(served, target, CheckpointError(f"load failed: {type(e).__name__}: {e}"))
                continue
            if self._pointer(name) != target:
                engine.close()  # superseded while it loaded: the next look follows the new pointer
                served.statuses[target] = self._recorded_status(name, target)
                served.pointer = None
                continue
            self._adopt(served, target, engine, accuracy)

    def _adopt(self, served: Served, target: str, engine: ImageEngine, accuracy: float | None) -> None:
        """A version that passed the gate: all new items at once, or a canary share first."""
        if not self.run_engines or self.settings.canary_fraction == 0.0 or served.engine is None:
            self._serve(served, target, engine, accuracy)
            return
        served.canary = Canary(engine, target, accuracy)
        served.statuses[target] = ("canary", None)
        log.info(
            "%s: version %s is a canary for %.0f%% of new items",
            served.name,
            target,
            100 * self.settings.canary_fraction,
        )

    def _settle_canary(self, served: Served) -> None:
        c = served.canary
        if c is None:
            return
        seen = c.ok + c.failed
        if seen < self.settings.canary_items:
            return
        rate = c.failed / seen
        served.canary = None
        if rate > self.settings.canary_max_error_rate:
            why = (
                f"canary error rate {rate:.3f} ({c.failed} of {seen} items failed) is above "
                f"`canary_max_error_rate` = {self.settings.canary_max_error_rate}"
            )
            self._record(served.name, c.version, Verdict(False, why))
            self._refused(served, c.version, CheckpointError(why))
            self._retiring.append((served.name, c.version, c.engine))
            return
        log.info("%s: canary %s served %d items, %d failed: promoted", served.name, c.version, seen, c.failed)
        self._serve(served, c.version, c.engine, c.accuracy)

    def _drop_canary(self, served: Served, why: str) -> None:
        c = served.canary
        if c is None:
            return
        served.canary = None
        served.statuses[c.version] = self._recorded_status(served.name, c.version)
        self._retiring.append((served.name, c.version, c.engine))
        log.info("%s: canary %s withdrawn (%s)", served.name, c.version, why)

    def _close_drained(self, in_use: Collection[object]) -> None:
        busy = {id(e) for e in in_use}
        keep = []
        for name, version, engine in self._retiring:
            if id(engine) in busy:
                keep.append((name, version, engine))
                continue
            engine.close()
            log.info("%s: version %s drained and unloaded", name, version)
        self._retiring = keep

    def record(self, model: str, engine: object, outcome: Outcome) -> None:
        """Count a finished item against a canary (its live error rate decides its promotion)."""
        served = self.models.get(model)
        c = served.canary if served is not None else None
        if c is None or c.engine is not engine:
            return
        with self._lock:
            if isinstance(outcome, GenerationFailed):
                c.failed += 1
            elif not isinstance(outcome, FewstepError):
                c.ok += 1

    def watch_forever(self, stop: threading.Event) -> None:
        """For a process with no serving thread (the Redis-mode gateway): follow the registry until `stop`."""
        self.loaded.wait()
        while not stop.is_set():
            self.maintain()
            self.nudged.wait(self.settings.watch_interval_s)

    def _teacher_folder(self, name: str, manifest: dict) -> Path | None:
        """The registry folder of the exact teacher the student was distilled from, if present and intact.

        Without it the student still serves; only `hybrid` requests are refused.
        """
        return teacher_or_none(self.registry, name, manifest)

    @property
    def ready(self) -> bool:
        """Loading finished, nothing failed, and every served model has a working version."""
        return (
            self.loaded.is_set()
            and self.load_error is None
            and bool(self.models)
            and all(s.engine is not None for s in self.models.values())
        )

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        for s in self.models.values():
            if s.engine is not None:
                s.engine.close()
            if s.canary is not None:
                s.canary.engine.close()

    # -- requests --------------------------------------------------------------------------
    def served(self, model: str) -> Served:
        """The model's serving state, NotReady while loading, NotFound if unknown."""
        if model not in self.models:
            if not self.loaded.is_set():
                raise NotReady("models are still loading")
            raise NotFound(f"model {model!r} not found; GET /v1/models lists the served models")
        s = self.models[model]
        if s.engine is None:
            raise NotReady(f"model {model!r} has no version that loads")
        return s

    def engine_for(self, model: str) -> ImageEngine:
        """The serving version's engine (NotFound / NotReady as `served`)."""
        engine = self.served(model).engine
        assert engine is not None
        return engine

    def route(self, model: str, job: str) -> ImageEngine:
        """The engine a new item of `job` starts on: the canary for its share of jobs, else the serving one.

        Chosen from a hash of the job id, so all items of a job (and every retry) meet one version.
        """
        s = self.served(model)
        engine = s.engine
        c = s.canary
        if c is not None and _share(job) < self.settings.canary_fraction:
            engine = c.engine
        assert engine is not None
        return engine


class _Busy(Exception):
    """Another process is loading this version now."""


def teacher_or_none(registry: Registry, name: str, manifest: dict) -> Path | None:
    """`Registry.teacher_dir`, logged: a missing or refused teacher disables the hybrid, nothing more."""
    try:
        folder = registry.teacher_dir(manifest)
    except FewstepError as e:
        log.warning("%s: teacher refused (%s); hybrid disabled", name, e)
        return None
    if folder is None:
        log.warning("%s: its teacher is not in the registry; hybrid disabled", name)
    return folder


class _Freshener:
    """Touches a load mark every MARK_TOUCH_S until stopped, so that others see the load is alive."""

    def __init__(self, registry: Registry, mark: Path) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(registry, mark), name="load-mark", daemon=True)
        self._thread.start()

    def _run(self, registry: Registry, mark: Path) -> None:
        while not self._done.wait(MARK_TOUCH_S):
            try:
                registry.touch_load(mark)
            except OSError:
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _share(key: str) -> float:
    """A stable number in [0, 1) for `key`."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
