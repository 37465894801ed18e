"""The FastAPI gateway: health, metrics, models, image generation and batch jobs.

`create_app(settings)` builds an app around a `Runtime` (what is served) and a `JobQueue`
(how work reaches engines); uvicorn serves it (`fewstep serve`). All generation goes through
the queue: a synchronous request is a small job on the interactive lane that the handler
waits for. With the embedded queue the gateway runs its own worker threads; with Redis,
`fewstep worker` processes do, and this process only validates, queues and waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fewstep.engines.base import ImageItem
from fewstep.errors import (
    Cancelled,
    CheckpointError,
    Conflict,
    FewstepError,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    NotReady,
    RegistryError,
    limit_error,
)
from fewstep.models.registry import check_name
from fewstep.models.schedules import MAX_SEED
from fewstep.service import errors
from fewstep.service.auth import AdminKeys, KeyRing
from fewstep.service.metrics import Metrics, QueueCollector
from fewstep.service.queue import open_queue
from fewstep.service.queue.base import JobSpec, JobStatus, fingerprint
from fewstep.service.queue.keys import BATCH, INTERACTIVE, SYNC_RESULT_TTL_S
from fewstep.service.runtime import Runtime
from fewstep.service.schemas import (
    ImageDatum,
    ImageGenerationRequest,
    ImageGenerationResponse,
    Job,
    JobCreateRequest,
    JobError,
    JobRequestItem,
    JobResult,
    JobResults,
    ModelCard,
    ModelList,
    ModelVersion,
    RollbackRequest,
    RollbackResponse,
)
from fewstep.service.settings import Settings
from fewstep.service.video import VideoStreams
from fewstep.service.video import install as install_video
from fewstep.service.watch import announce, subscribe
from fewstep.service.worker import Worker, engine_lookup, worker_name

log = logging.getLogger("fewstep.service")
RESPONSE_FORMATS = ("b64_json",)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
T = TypeVar("T")


def build_items(
    req: ImageGenerationRequest | JobRequestItem, model: str, settings: Settings, runtime: Runtime, where: str = ""
) -> list[ImageItem]:
    """Validate one image request against the settings and the model; one item per image.

    `where` prefixes field names in messages ("requests[3]." inside a job).
    """
    served = runtime.served(model)
    assert served.engine is not None
    info = served.engine.info

    def limit(name: str, rule: str, given: object) -> InvalidRequest:
        return limit_error(where + name, rule, given)

    if not req.prompt.strip():
        raise limit("prompt", "a non-empty string", req.prompt)
    if len(req.prompt) > settings.max_prompt_chars:
        raise limit("prompt", f"at most {settings.max_prompt_chars} characters long", f"{len(req.prompt)} characters")
    if not 1 <= req.n <= settings.max_n:
        raise limit("n", f"between 1 and {settings.max_n}", req.n)
    if req.size is not None and req.size != info.size:
        raise limit("size", f"{info.size!r} (the model's native size)", req.size)
    if req.response_format not in RESPONSE_FORMATS:
        raise limit("response_format", " or ".join(repr(f) for f in RESPONSE_FORMATS), req.response_format)
    steps = info.default_steps if req.steps is None else req.steps
    if steps not in info.steps:
        raise limit("steps", f"between {min(info.steps)} and {max(info.steps)}", steps)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED - settings.max_n:
        raise limit("seed", f"between 0 and {MAX_SEED - settings.max_n}", req.seed)
    base = req.seed if req.seed is not None else secrets.randbelow(1 << 31)
    items = [ImageItem(prompt=req.prompt, seed=base + i, steps=steps, hybrid=req.hybrid) for i in range(req.n)]
    for it in items:
        try:
            served.engine.validate(it)
        except InvalidRequest as e:
            raise InvalidRequest(where + e.field, str(e).replace(f"`{e.field}`", f"`{where}{e.field}`")) from e
    return items


def job_view(st: JobStatus) -> Job:
    return Job(**dataclasses.asdict(st))


def sse(event: str, data: dict[str, Any], cursor: str | None = None) -> str:
    """One Server-Sent Event; `id` lets a client resume with `Last-Event-ID`."""
    head = f"id: {cursor}\n" if cursor else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, by header or by counting the stream."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, int(declared))
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge as e:
            await self._reject(scope, receive, send, e.size)

    async def _reject(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        msg = f"`max_body_bytes` is {self.limit}. Given: {size} bytes"
        resp = JSONResponse(errors.error_body(msg, "InvalidRequest", "body"), status_code=413)
        await resp(scope, receive, send)


class CountRequests:
    """ASGI middleware: count responses by route template and status.

    Plain ASGI rather than `@app.middleware("http")`: that wrapper hides client disconnects
    from handlers, and a synchronous request must see its client leave to cancel its work.
    """

    def __init__(self, app: Any, counter: Any) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.counter.labels(getattr(route, "path", "unmatched"), str(status)).inc()


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    queue = open_queue(settings)
    metrics.registry.register(QueueCollector(queue.stats))
    workers: list[Worker] = []

    def start_workers() -> None:
        """Runs in the thread that loaded the models, which then becomes the first worker.

        Each thread that runs torch gets its own OpenMP team; two teams of `threads` on a
        machine with no spare cores make libgomp throttle its spin-waits, which slowed
        inference 1.5–2.4× here. Loading and serving in one thread keeps one team.
        """
        if not settings.embedded_workers:
            runtime.watch_forever(stopping)  # nothing runs here: just follow the registry
            return
        lookup = engine_lookup(settings, runtime.engine_for)
        route = runtime.route if settings.engine == "image" else None

        def maintain() -> None:
            runtime.maintain([e for w in workers for e in w.scheduler.engines])

        made = [
            Worker(
                queue, lookup, settings, metrics, route=route, maintain=None if i else maintain, finished=runtime.record
            )
            for i in range(settings.embedded_workers)
        ]
        workers.extend(made)
        for w in made[1:]:
            w.start()
        made[0].run()  # the first worker also follows the registry, between its steps

    run_engines = settings.embedded_workers > 0 and settings.engine == "image"
    runtime = Runtime(settings, metrics, run_engines=run_engines, on_loaded=start_workers, loader=worker_name())
    videos = VideoStreams(settings, metrics, runtime.registry)
    stopping = threading.Event()
    keys = KeyRing(settings)
    admins = AdminKeys(settings)
    if not keys.enabled:
        log.warning("FEWSTEP_API_KEYS is not set: the API accepts requests without authentication")
    # Blocking queue waits (sync requests, SSE) get their own threads, not the default pool's few.
    waits = ThreadPoolExecutor(max_workers=128, thread_name_prefix="queue-wait")

    async def call(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(waits, functools.partial(fn, *args))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        videos.start(runtime.loaded, lambda: runtime.encoder)
        subscribe(settings, runtime.nudged, stopping)
        yield
        stopping.set()
        for w in workers:
            await asyncio.to_thread(w.stop)
        queue.close()
        waits.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(videos.close)
        await asyncio.to_thread(runtime.close)

    app = FastAPI(title="fewstep", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.runtime, app.state.metrics, app.state.queue = settings, runtime, metrics, queue
    app.state.videos = videos
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    app.add_middleware(CountRequests, counter=metrics.requests)

    def principal(request: Request) -> str:
        return keys.principal(request.headers.get("authorization"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not runtime.ready:
            reason = runtime.load_error or (
                "loading" if not runtime.loaded.is_set() else "a model has no working version"
            )
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        if not videos.ready:
            return JSONResponse({"status": "not ready", "reason": "video models are loading"}, status_code=503)
        try:
            await call(queue.ping)
        except NotReady as e:
            return JSONResponse({"status": "not ready", "reason": str(e)}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await call(generate_latest, metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(_: str = Depends(principal)) -> ModelList:
        cards = []
        for s in runtime.models.values():
            info = s.engine.info if s.engine is not None else None
            cards.append(
                ModelCard(
                    id=s.name,
                    created=s.created,
                    kind=s.kind,
                    version=s.version,
                    versions=[ModelVersion(version=v, status=st, reason=why) for v, (st, why) in s.statuses.items()],
                    steps=info.steps if info else [],
                    default_steps=info.default_steps if info else 0,
                    size=info.size if info else "",
                    backend=settings.backend,
                    precision=settings.precision,
                    hybrid=bool(info and info.extra.get("hybrid")),
                )
            )
        for info in videos.infos():
            cards.append(
                ModelCard(
                    id=info.model,
                    created=videos.created.get(info.model, 0),
                    kind="video",
                    version=info.version,
                    versions=[
                        ModelVersion(version=v, status=st, reason=why)
                        for v, (st, why) in videos.statuses.get(info.model, {}).items()
                    ],
                    steps=info.steps,
                    default_steps=info.default_steps,
                    size=info.size,
                    backend=info.backend,
                    precision=info.precision,
                    hybrid=bool(info.extra.get("hybrid")),
                )
            )
        return ModelList(data=cards)

    async def wait_settled(job_id: str, timeout: float, request: Request) -> str:
        """Wait for a job's end event: "done", "timeout", or "gone" (the client disconnected)."""
        deadline = time.monotonic() + timeout
        cursor = "0"
        while (left := deadline - time.monotonic()) > 0:
            events = await call(queue.events, job_id, cursor, min(left, 0.25))
            if events:
                cursor = events[-1].cursor
                if any(e.kind == "end" for e in events):
                    return "done"
            if await request.is_disconnected():
                return "gone"
        return "timeout"

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def generate_images(
        req: ImageGenerationRequest, request: Request, owner: str = Depends(principal)
    ) -> ImageGenerationResponse:
        t0 = time.perf_counter()
        items = build_items(req, req.model, settings, runtime)
        ttl = max(SYNC_RESULT_TTL_S, int(settings.request_timeout_s) + 60)
        job = await call(queue.submit, JobSpec(owner, req.model, items, INTERACTIVE, ttl))
        outcome = await wait_settled(job.id, settings.request_timeout_s, request)
        if outcome != "done":
            await call(queue.cancel, job.id, owner)  # its items leave the running batch at the next step
            if outcome == "gone":
                raise Cancelled("the client disconnected")
            raise NotReady(f"request took longer than `request_timeout_s` = {settings.request_timeout_s}")
        results = await call(queue.results, job.id, owner)
        for r in results:
            if r.outcome == "cancelled":
                raise Cancelled(r.error or "cancelled")
            if r.outcome != "ok":
                raise GenerationFailed(r.error or "generation failed")
        steps = items[0].steps
        metrics.request_seconds.labels(req.model, str(steps)).observe(time.perf_counter() - t0)
        metrics.images.labels(req.model, str(steps)).inc(len(results))
        served = runtime.served(req.model)
        assert served.engine is not None
        return ImageGenerationResponse(
            created=int(time.time()),
            model=req.model,
            model_version=results[0].model_version or "",
            steps=steps,
            nfe=sum(r.nfe for r in results) // len(results),
            hybrid=req.hybrid,
            size=served.engine.info.size,
            data=[ImageDatum(b64_json=r.b64_json or "", seed=r.seed) for r in results],
        )

    @app.post("/v1/jobs", status_code=202, response_model=Job)
    async def create_job(
        body: JobCreateRequest,
        owner: str = Depends(principal),
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Job:
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise limit_error("Idempotency-Key", "1 to 255 printable ASCII characters", idempotency_key[:300])
        if not 1 <= len(body.requests) <= settings.max_job_items:
            raise limit_error("requests", f"a list of 1 to {settings.max_job_items} requests", len(body.requests))
        items: list[ImageItem] = []
        origin: list[int] = []
        for i, r in enumerate(body.requests):
            made = build_items(r, body.model, settings, runtime, where=f"requests[{i}].")
            items += made
            origin += [i] * len(made)
            if len(items) > settings.max_job_items:
                raise limit_error("requests", f"at most {settings.max_job_items} images in all", f"{len(items)}+")
        spec = JobSpec(
            owner=owner,
            model=body.model,
            items=items,
            lane=BATCH,
            ttl_s=settings.result_ttl_s,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint(body.model, [r.model_dump() for r in body.requests]),
            requests=origin,
        )
        return job_view(await call(queue.submit, spec))

    @app.get("/v1/jobs/{job_id}", response_model=Job)
    async def get_job(job_id: str, owner: str = Depends(principal)) -> Job:
        return job_view(await call(queue.status, job_id, owner))

    @app.delete("/v1/jobs/{job_id}", response_model=Job)
    async def cancel_job(job_id: str, owner: str = Depends(principal)) -> Job:
        return job_view(await call(queue.cancel, job_id, owner))

    @app.get("/v1/jobs/{job_id}/results", response_model=JobResults)
    async def job_results(job_id: str, owner: str = Depends(principal)) -> JobResults:
        status = await call(queue.status, job_id, owner)
        results = await call(queue.results, job_id, owner)
        return JobResults(
            status=status.status,
            data=[
                JobResult(
                    index=r.index,
                    request=r.request,
                    b64_json=r.b64_json or "",
                    seed=r.seed,
                    steps=r.steps,
                    nfe=r.nfe,
                    model_version=r.model_version,
                )
                for r in results
                if r.outcome == "ok"
            ],
            errors=[
                JobError(index=r.index, request=r.request, outcome=r.outcome, message=r.error)
                for r in results
                if r.outcome != "ok"
            ],
        )

    @app.post("/v1/admin/models/{model}/rollback", response_model=RollbackResponse)
    async def rollback(
        model: str, body: RollbackRequest | None = None, authorization: str | None = Header(None)
    ) -> RollbackResponse:
        """Point `model` at an older version (default: the newest older one the gate did not refuse)."""
        admins.require(authorization)
        to = body.to if body is not None else None
        for field, kind, name in (("model", "model", model), ("to", "version", to)):
            try:
                if name is not None:
                    check_name(kind, name)
            except RegistryError as e:
                raise InvalidRequest(field, str(e)) from e
        if model not in runtime.registry.models():
            raise NotFound(f"model {model!r} not found in the registry")
        try:
            previous = runtime.registry.promoted(model)
        except RegistryError:
            previous = None  # a broken pointer: the rollback repairs it
        try:
            version = await call(runtime.registry.rollback, model, to, runtime.flavour)
        except (RegistryError, CheckpointError) as e:
            raise Conflict(str(e).replace(f"{runtime.registry.root}/", "")) from e
        log.warning("admin rollback: %s %s → %s", model, previous, version)
        await call(announce, settings, model, version, "rollback")
        runtime.nudged.set()
        return RollbackResponse(model=model, version=version, previous=previous)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(
        job_id: str,
        owner: str = Depends(principal),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    ) -> StreamingResponse:
        first = await call(queue.status, job_id, owner)

        async def stream() -> AsyncIterator[str]:
            yield sse("status", job_view(first).model_dump())
            cursor = last_event_id or "0"
            quiet_since = time.monotonic()
            while True:
                try:
                    events = await call(queue.events, job_id, cursor, 1.0)
                except FewstepError as gone:  # the job expired or the queue went away mid-stream
                    yield sse("error", {"message": str(gone)})
                    return
                if not events:
                    if time.monotonic() - quiet_since >= settings.sse_keepalive_s:
                        quiet_since = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                quiet_since = time.monotonic()
                st = await call(queue.status, job_id, owner)
                counts = {"done": st.done, "failed": st.failed, "cancelled": st.cancelled, "total": st.total}
                for ev in events:
                    cursor = ev.cursor
                    if ev.kind == "item":
                        yield sse("item", {"index": ev.index, "outcome": ev.outcome, **counts}, ev.cursor)
                    elif ev.kind == "cancel":
                        yield sse("cancel", counts, ev.cursor)
                    else:
                        yield sse("end", job_view(st).model_dump(), ev.cursor)
                        return

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    install_video(app, settings, videos, keys, metrics)
    return app
