"""The model runtime: registry → engines, and the state `/readyz` and `/v1/models` report.

Models load in a background thread so the process answers `/healthz` at once. For each model
the promoted version is tried first; a version that is refused (bad manifest, hash mismatch,
wrong shapes, non-finite warm-up) is recorded with its reason and the newest older version
that loads serves instead, so a bad checkpoint never takes the model down.

A process that runs engines (a worker, or a gateway with embedded workers) loads and warms
the weights. A gateway that only queues work (Redis mode) reads manifests only: enough to
validate requests (steps, size, hybrid) without holding weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.engines.image import ImageEngine
from fewstep.errors import FewstepError, NotFound, NotReady
from fewstep.models.registry import Registry
from fewstep.models.text import TextEncoder
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.runtime")
SERVED_KINDS = ("image",)


@dataclass
class Served:
    """One model as the gateway knows it."""

    name: str
    kind: str
    engine: ImageEngine | None = None
    version: str | None = None
    created: int = 0
    statuses: dict[str, tuple[str, str | None]] = field(default_factory=dict)


class Runtime:
    """Owns the text encoder and the engines. `run_engines=False`: manifests only, nothing runs here."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        run_engines: bool = True,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.run_engines = run_engines
        self.on_loaded = on_loaded
        self.registry = Registry(settings.registry)
        self.models: dict[str, Served] = {}
        self.encoder: TextEncoder | None = None
        self.loaded = threading.Event()
        self.load_error: str | None = None
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
                self._load_model(name)
            self.metrics.models_ready.set(sum(1 for s in self.models.values() if s.engine is not None))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model loading failed")
        finally:
            self.loaded.set()
        if self.on_loaded is not None and self.load_error is None:
            self.on_loaded()  # may run for the life of the process (the gateway's first worker)

    def load(self) -> None:
        """Load in the calling thread (a worker process has nothing to answer meanwhile)."""
        self._load_all()

    def _load_model(self, name: str) -> None:
        versions = self.registry.versions(name)
        if not versions:
            return
        promoted = self.registry.promoted(name) or versions[-1]
        try:
            kind = self.registry.manifest(name, promoted).get("kind")
        except FewstepError as e:
            kind = "image"
            log.warning("cannot read %s:%s manifest: %s", name, promoted, e)
        if kind not in SERVED_KINDS:
            return
        served = Served(name=name, kind=str(kind))
        self.models[name] = served
        older = [v for v in reversed(versions) if v != promoted and versions.index(v) < versions.index(promoted)]
        for version in [promoted, *older]:
            try:
                manifest = self.registry.validate(name, version)
                engine = ImageEngine(
                    self.registry.version_dir(name, version),
                    self.encoder,
                    self.settings.backend,
                    self.settings.precision,
                    version=version,
                    teacher_folder=self._teacher_folder(name, manifest),
                )
                if self.run_engines:
                    engine.load()
                    engine.warmup()
            except FewstepError as e:
                # Clients see the reason, not the server's filesystem layout.
                served.statuses[version] = ("refused", str(e).replace(f"{self.registry.root}/", ""))
                self.metrics.model_refused.labels(name).inc()
                log.error("refused %s:%s: %s", name, version, e)
                continue
            served.engine, served.version = engine, version
            served.created = int(self.registry.version_dir(name, version).stat().st_mtime)
            served.statuses[version] = ("serving", None)
            log.info(
                "%s %s:%s on %s/%s",
                "serving" if self.run_engines else "routing",
                name,
                version,
                self.settings.backend,
                self.settings.precision,
            )
            break
        for v in versions:
            served.statuses.setdefault(v, ("ready", None))

    def _teacher_folder(self, name: str, manifest: dict) -> Path | None:
        """The registry folder of the exact teacher the student was distilled from, if present and intact.

        Without it the student still serves; only `hybrid` requests are refused.
        """
        ref = manifest.get("teacher") or {}
        try:
            version = self.registry.find(ref["name"], ref["sha256"])
            if version is None:
                log.warning(
                    "%s: teacher %s (sha256 %s…) is not in the registry; hybrid disabled",
                    name,
                    ref["name"],
                    ref["sha256"][:12],
                )
                return None
            self.registry.validate(ref["name"], version)
            return self.registry.version_dir(ref["name"], version)
        except (KeyError, TypeError):
            return None
        except FewstepError as e:
            log.warning("%s: teacher refused (%s); hybrid disabled", name, e)
            return None

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
        for s in self.models.values():
            if s.engine is not None:
                s.engine.close()

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
        """The loaded engine of a model, for workers."""
        engine = self.served(model).engine
        assert engine is not None
        return engine
