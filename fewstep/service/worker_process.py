"""`fewstep worker`: one worker process on the Redis queue (general worker thread plus the interactive-only
ones), with the image models loaded, gated and watched for new versions like the gateway's."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

from fewstep.engines.base import StepEngine
from fewstep.service.metrics import Metrics
from fewstep.service.queue import open_queue
from fewstep.service.settings import Settings
from fewstep.service.worker import Worker, process_workers, worker_name

if TYPE_CHECKING:
    from fewstep.service.versions import Versions


def run_worker(settings: Settings, name: str | None = None, metrics_port: int | None = None) -> int:
    """Load the models (image engines), then claim and run items until SIGTERM / SIGINT has drained the
    running batch; the exit status (2: no Redis configured, 1: the registry cannot be read)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.redis_url is None:
        print("fewstep worker: set FEWSTEP_REDIS_URL (workers consume the Redis queue)", file=sys.stderr)
        return 2
    metrics = Metrics(role="worker")
    name = name or worker_name()
    models: Versions[StepEngine] | None = None
    stop_watch = threading.Event()
    workers: list[Worker] = []
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()
        for w in workers:
            w.request_stop()

    # Installed before the models load: a SIGTERM while loading (or gating) lets the load finish, so that
    # it leaves no half-done load mark behind to count against a good version, and then exits 0.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if settings.engine == "registry":
        from fewstep.engines.backends.torch import set_intra_op_threads
        from fewstep.models.registry import Registry
        from fewstep.service.app import step_kinds
        from fewstep.service.kinds import Context
        from fewstep.service.versions import Versions
        from fewstep.service.watch import subscribe

        set_intra_op_threads(settings.intra_op_threads(1))  # every core until an interactive-only worker runs
        ctx = Context(settings, Registry(settings.registry))
        ctx.registry.seed_from(settings.checkpoints)
        models = Versions[StepEngine](ctx, metrics, step_kinds(), loader=name)
        models.load()
        if models.load_error is not None:  # the registry itself cannot be read: nothing here could ever serve
            print(f"fewstep worker: the registry cannot be read ({models.load_error})", file=sys.stderr)
            return 1
        # A model with no version that loads is not a reason to exit (a crash loop would not mend it): this
        # worker serves the others and follows the registry for a version of it that passes.
        subscribe(settings, [models.nudged], stop_watch)

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.host, registry=metrics.registry)
    workers += process_workers(open_queue(settings), settings, metrics, name, 1, models)
    worker, reserved = workers[0], workers[1:]
    if stopping.is_set():  # asked to stop while loading: nothing was claimed
        stop_watch.set()
        return 0
    logging.getLogger("fewstep.worker").info(
        "worker %s consuming %s (%d interactive-only beside it)", worker.name, settings.redis_prefix, len(reserved)
    )
    for w in reserved:
        w.start()
    worker.run()
    for w in reserved:
        w.stop()
    stop_watch.set()
    return 0
