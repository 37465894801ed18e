"""What a process knows of the models it answers for, and the part of the version lifecycle that reads only
manifests.

`Catalog` is the common part: the registry's models of some kinds (`service/kinds.py`), each with the
version new work goes to, every version's status, and the `PROMOTED` pointer each last acted on. Requests
read it from any thread (`model`, `spec`, `models`); its own thread changes it, replacing `Model` fields
whole. Two processes keep one:

- `Routing` (here), in a process that runs no engine of these kinds (a gateway in Redis mode, whose
  workers serve the image models): specs come from manifests, nothing is loaded, and a new version is
  followed once a worker's gate has recorded its verdict.
- `Versions` (`service/versions.py`), in a process that runs the engines: it loads, gates, canaries,
  swaps and unloads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection

from fewstep.engines.specs import Spec
from fewstep.errors import CheckpointError, FewstepError, NotFound, NotReady, RegistryError
from fewstep.service.kinds import Context
from fewstep.service.loading import Loader
from fewstep.service.metrics import Metrics
from fewstep.service.served import Loaded, Model, Status

log = logging.getLogger("fewstep.runtime")


class Catalog:
    """The models of `kinds` as this process answers for them; `Routing` and `Versions` say how versions
    become the serving one."""

    ACTING = "serving"
    """How the log names what this process does with a version."""

    def __init__(self, ctx: Context, metrics: Metrics, kinds: Collection[str], loader: str) -> None:
        """`loader`: this process's name on the registry's load marks."""
        self.ctx, self.metrics = ctx, metrics
        self.settings, self.registry = ctx.settings, ctx.registry
        self.kinds = set(kinds)
        self.models: dict[str, Model] = {}
        self.loaded = threading.Event()
        """Set once start-up loading has ended (whether or not it worked: see `ready`)."""
        self.load_error: str | None = None
        """Why start-up could not even begin (the registry cannot be read); None otherwise."""
        self.nudged = threading.Event()
        """Set by a push announcement: `maintain` looks at the registry without waiting for the interval."""
        self.loader = Loader(ctx, metrics, loader)
        self._next_look = 0.0
        self._bad_pointers: dict[str, str] = {}
        self._unserved: set[str] = set()
        """Models of other kinds (another part of the process serves them)."""

    # -- start ------------------------------------------------------------------------------------
    def load(self) -> None:
        """Take every model of these kinds with its first serving version, in the calling thread; `loaded` is
        set when done. A model none of whose versions works is kept, reported (`/v1/models`, metrics) and
        refused per request; the others serve regardless."""
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

    def fail(self, why: str) -> None:
        """End start-up without loading: what had to come first (seeding the registry) failed for `why`."""
        self.load_error = why
        self.loaded.set()

    def skip(self) -> None:
        """End start-up with nothing to load: this process is configured to serve none of these kinds."""
        self.loaded.set()

    def _place(self, name: str, model: Model | None) -> None:
        """Take a model `_first_version` made into `models` (None: none yet, or not of a kind served here)."""
        if model is None:
            if self.registry.versions(name):
                self._unserved.add(name)
            return
        self.models[name] = model
        self._count_ready()

    def _first_version(self, name: str) -> Model | None:
        """A model of these kinds with its first serving version (or none that works); None when the model is
        not of these kinds or has no version. It changes only the model it makes (and counts refusals): it may
        run in a loader thread, and `_place` takes its model in."""
        versions = self.registry.versions(name)
        if not versions:
            return None
        promoted = self._pointer(name) or versions[-1]
        kind = self._kind(name, [promoted, *reversed(versions)])
        if kind not in self.kinds:
            return None
        model = Model(name=name, kind=kind, pointer=promoted)
        upto = versions[: versions.index(promoted) + 1] if promoted in versions else versions
        order = self._order(model, promoted, [v for v in reversed(upto) if v != promoted])
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

    def _order(self, model: Model, promoted: str, older: list[str]) -> list[str]:
        """The versions to try at start, first to last: the promoted one, then the older ones, newest first."""
        return [promoted, *older]

    def _candidate(self, model: Model, version: str) -> Loaded:
        """`version` ready to take new work here; a `FewstepError` when it is refused."""
        raise NotImplementedError

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
        """Make `loaded` take every new item of the model; the version it replaces goes back to its recorded
        status (and, where it ran here, drains: `_retire`)."""
        old = model.serving
        model.serving = loaded
        model.created = int(self.registry.version_dir(model.name, loaded.version).stat().st_mtime)
        model.statuses[loaded.version] = ("serving", None)
        if old is not None and old.version != loaded.version:
            model.statuses[old.version] = self._recorded_status(model, old.version)
            self._retire(model, old)
            self.metrics.model_swaps.labels(model.name).inc()
            log.info("%s: version %s serves new items; %s drains", model.name, loaded.version, old.version)
        else:
            s = loaded.spec
            log.info("%s %s:%s on %s/%s", self.ACTING, model.name, loaded.version, s.backend, s.precision)
        self._count_ready()

    def _retire(self, model: Model, loaded: Loaded) -> None:
        """`loaded` takes no new work any more."""

    def _count_ready(self) -> None:
        models = list(self.models.values())
        for kind in {m.kind for m in models}:
            ready = sum(1 for m in models if m.kind == kind and m.serving is not None)
            self.metrics.models_ready.labels(kind).set(ready)
            self.metrics.models_unavailable.labels(kind).set(sum(1 for m in models if m.kind == kind) - ready)

    # -- following the registry -------------------------------------------------------------------
    def _look(self) -> None:
        """Follow every model's pointer, when the watch interval is up or a push announcement nudged."""
        now = time.monotonic()
        nudged = self.nudged.is_set()
        if not nudged and now < self._next_look:
            return
        self.nudged.clear()
        self._next_look = now + self.settings.watch_interval_s
        for name in self.registry.models():
            if name in self._unserved:
                continue
            try:
                self.follow(name, recheck=nudged)
            except Exception:  # the registry is shared input: a surprise there must not stop serving
                log.exception("following %s failed", name)

    def follow(self, name: str, recheck: bool = False) -> None:
        """Bring one model in line with its pointer (no-op when it already is).

        `recheck`: also re-read the recorded verdicts of versions shown as ready (another process
        announced one); otherwise only new versions' records are read, to keep each look cheap."""
        model = self.models.get(name)
        if model is None:
            self._arrived(name)
            return
        target = self._pointer(name)
        for v in self.registry.versions(name):
            st = model.statuses.get(v)
            if st is None or (recheck and st[0] == "ready"):
                model.statuses[v] = self._recorded_status(model, v)
        if target is not None and target != model.pointer:
            self._moved(model, target)

    def _arrived(self, name: str) -> None:
        """A model this process does not hold yet (pushed after start, or with no version until now)."""
        raise NotImplementedError

    def _moved(self, model: Model, target: str) -> None:
        """The model's pointer names `target`, which this process has not acted on yet."""
        raise NotImplementedError

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

    def close(self) -> None:
        """Release what this process holds of its models."""


class Routing(Catalog):
    """The models of `kinds` in a process that only routes work to the processes that run them.

    Specs come from manifests; no weights are read. A version the pointer names is followed once the
    workers' gate has recorded a verdict on it: passed, it takes new work at once (the workers run their
    own canary); refused, it is reported and the serving version stays."""

    ACTING = "routing"

    def _candidate(self, model: Model, version: str) -> Loaded:
        spec, scores = self.loader.spec(model.kind, model.name, version)
        return Loaded(version, None, scores, spec=spec)

    def _arrived(self, name: str) -> None:
        self._place(name, self._first_version(name))

    def _moved(self, model: Model, target: str) -> None:
        serving = model.serving.version if model.serving else None
        if target != serving:
            verdict = self.loader.verdict(model.kind, model.name, target)
            if verdict is None:
                return  # not judged yet: look again at the next look
            if not verdict["passed"]:
                model.pointer = target
                model.statuses[target] = ("refused", verdict.get("reason"))
                return
        model.pointer = target
        if target == serving:
            return
        try:
            loaded = self._candidate(model, target)
        except Exception as e:  # its manifest does not read here: reported, and the serving version stays
            self._refused(model, target, refusal(e))
            return
        self._serve(model, loaded)

    def maintain(self) -> None:
        """Follow the registry (when the watch interval is up, or nudged)."""
        if self.ready:
            self._look()

    def watch_forever(self, stop: threading.Event) -> None:
        """Follow the registry until `stop`."""
        self.loaded.wait()
        while not stop.is_set():
            self.maintain()
            self.nudged.wait(self.settings.watch_interval_s)


def refusal(e: Exception) -> FewstepError:
    """What refuses a version for `e`: a domain error as it is, anything else as a `CheckpointError` naming it."""
    return e if isinstance(e, FewstepError) else CheckpointError(f"load failed: {type(e).__name__}: {e}")
