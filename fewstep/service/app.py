"""The FastAPI gateway: `create_app(settings)` wires the parts together; the routes live in `routes/`.

All image generation goes through the job queue: a synchronous request is a small job on the
interactive lane that its handler waits for. With the embedded queue the gateway runs its own worker
threads; with Redis, `fewstep worker` processes do, and this process only validates, queues and waits
(it reads its models' specs from the registry and follows the workers' gate verdicts). Video streams
are stateful and always run here (`service/streams.py`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI

from fewstep.engines.backends.torch import set_intra_op_threads
from fewstep.engines.base import StepEngine, StreamEngine
from fewstep.models.registry import Registry
from fewstep.service import errors
from fewstep.service.auth import AdminKeys, KeyRing
from fewstep.service.catalog import Catalog, Routing
from fewstep.service.clips import VideoClips
from fewstep.service.events import EventHub
from fewstep.service.kinds import KINDS, Context
from fewstep.service.limits import open_limits
from fewstep.service.metrics import Metrics, QueueCollector
from fewstep.service.middleware import BodyLimit, CountRequests, Draining, HeaderLimit, TrustedHosts
from fewstep.service.openapi import document_errors
from fewstep.service.queue import open_queue
from fewstep.service.routes import admin, health, images, jobs, models, playground, realtime, video, videos
from fewstep.service.settings import Settings
from fewstep.service.state import Gateway
from fewstep.service.streams import VideoStreams
from fewstep.service.versions import Versions
from fewstep.service.watch import subscribe
from fewstep.service.webhooks import WebhookSender
from fewstep.service.worker import Worker, process_workers, worker_name

log = logging.getLogger("fewstep.service")


def step_kinds() -> list[str]:
    """Model kinds whose engines are step engines, served by workers through the queue."""
    return [name for name, kind in KINDS.items() if kind.serves == "steps"]


def stream_kinds() -> list[str]:
    """Model kinds whose engines are stream engines, served by the gateway that holds the socket."""
    return [name for name, kind in KINDS.items() if kind.serves == "streams"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    queue = open_queue(settings)
    metrics.registry.register(QueueCollector(queue.stats))
    ctx = Context(settings, Registry(settings.registry))
    name = worker_name()
    # Image models run here with embedded workers on the image engine; otherwise this process only routes to
    # them (Redis workers run them, or the no-op engine stands in) and reads their manifests.
    image_models: Catalog
    if settings.embedded_workers > 0 and settings.engine == "registry":
        image_models = Versions[StepEngine](ctx, metrics, step_kinds(), loader=name)
    else:
        image_models = Routing(ctx, metrics, step_kinds(), loader=name)
    stream_models: Versions[StreamEngine] = Versions(ctx, metrics, stream_kinds(), loader=name)
    streams = VideoStreams(settings, metrics, stream_models)
    clips = VideoClips(settings, metrics, queue, streams, name)
    keys = KeyRing(settings)
    if not keys.enabled:
        log.warning("FEWSTEP_API_KEYS is not set: the API accepts requests without authentication")
    gw = Gateway(
        settings,
        metrics,
        queue,
        image_models,
        streams,
        keys,
        AdminKeys(settings),
        ThreadPoolExecutor(max_workers=128, thread_name_prefix="queue-wait"),
        open_limits(settings),
        EventHub(queue),
        clips=clips,
    )
    webhooks = WebhookSender(queue, settings, metrics) if settings.webhook_secret is not None else None
    seeded, stopping = threading.Event(), threading.Event()
    workers: list[Worker] = []

    def serve_images() -> None:
        """Seed the registry, load the image models, then become the first worker.

        Each thread that runs torch gets its own OpenMP team; two teams of `threads` on a machine with
        no spare cores make libgomp throttle its spin-waits, which slowed inference 1.5–2.4× here.
        Loading and serving in one thread keeps one team."""
        # Loading and the first general worker share this thread: one OpenMP team, with every core until an
        # interactive-only worker runs beside it (`Cores`).
        set_intra_op_threads(settings.intra_op_threads(settings.embedded_workers))
        try:
            for model, version in ctx.registry.seed_from(settings.checkpoints):
                log.info("registry seeded with %s:%s from %s", model, version, settings.checkpoints)
        except Exception as e:
            log.exception("seeding the registry failed")
            image_models.fail(f"{type(e).__name__}: {e}")
            return
        finally:
            seeded.set()
        image_models.load()
        if not image_models.ready:
            return
        if isinstance(image_models, Routing) and not settings.embedded_workers:
            image_models.watch_forever(stopping)  # nothing runs here: just follow the registry
            return
        made = process_workers(queue, settings, metrics, name, settings.embedded_workers, image_models)
        workers.extend(made)
        for w in made[1:]:
            w.start()
        made[0].run()  # the first worker also follows the registry, between its steps

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=serve_images, name="runtime-load", daemon=True).start()
        streams.start(seeded)
        clips.start()
        subscribe(settings, [image_models.nudged, streams.versions.nudged], stopping)
        if webhooks is not None:
            webhooks.start()
        yield
        stopping.set()
        if webhooks is not None:
            await asyncio.to_thread(webhooks.stop)
        for w in workers:
            await asyncio.to_thread(w.stop)
        await asyncio.to_thread(clips.close)
        gw.events.close()
        queue.close()
        gw.limits.close()
        gw.waits.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(streams.close)
        await asyncio.to_thread(image_models.close)

    app = FastAPI(title="fewstep", version=metadata.version("fewstep"), lifespan=lifespan)
    app.state.gateway = gw
    errors.install(app)
    document_errors(app)
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        uploads=settings.upload_max_bytes,
    )
    app.add_middleware(HeaderLimit, limit=settings.max_header_bytes)
    if (hosts := settings.trusted_hosts(keys.enabled)) != ["*"]:
        app.add_middleware(TrustedHosts, allowed=hosts)
    app.add_middleware(CountRequests, counter=metrics.requests)
    app.add_middleware(Draining, drain=gw.drain)  # outermost: refused while draining before anything is read
    for routes in (health, models, images, jobs, admin, video, videos, realtime, playground):
        app.include_router(routes.router)
    return app
