"""The FastAPI application: health, metrics, models and image generation.

`create_app(settings)` builds an app around a `Runtime`; uvicorn serves it (`fewstep serve`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.errors import FewstepError, limit_error
from fewstep.models.schedules import MAX_SEED
from fewstep.service import errors
from fewstep.service.auth import KeyRing
from fewstep.service.metrics import Metrics
from fewstep.service.runtime import Runtime
from fewstep.service.schemas import (
    ImageDatum,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelList,
    ModelVersion,
)
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.service")
RESPONSE_FORMATS = ("b64_json",)


def encode_png(pixels: Any) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_items(req: ImageGenerationRequest, settings: Settings, runtime: Runtime) -> list[ImageItem]:
    """Validate a request against the settings and the model; one item per image."""
    served = runtime.served(req.model)
    assert served.engine is not None
    info = served.engine.info
    if not req.prompt.strip():
        raise limit_error("prompt", "a non-empty string", req.prompt)
    if len(req.prompt) > settings.max_prompt_chars:
        raise limit_error(
            "prompt", f"at most {settings.max_prompt_chars} characters long", f"{len(req.prompt)} characters"
        )
    if not 1 <= req.n <= settings.max_n:
        raise limit_error("n", f"between 1 and {settings.max_n}", req.n)
    if req.size is not None and req.size != info.size:
        raise limit_error("size", f"{info.size!r} (the model's native size)", req.size)
    if req.response_format not in RESPONSE_FORMATS:
        raise limit_error("response_format", " or ".join(repr(f) for f in RESPONSE_FORMATS), req.response_format)
    steps = info.default_steps if req.steps is None else req.steps
    if steps not in info.steps:
        raise limit_error("steps", f"between {min(info.steps)} and {max(info.steps)}", steps)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED - settings.max_n:
        raise limit_error("seed", f"between 0 and {MAX_SEED - settings.max_n}", req.seed)
    base = req.seed if req.seed is not None else secrets.randbelow(1 << 31)
    items = [ImageItem(prompt=req.prompt, seed=base + i, steps=steps, hybrid=req.hybrid) for i in range(req.n)]
    for it in items:
        served.engine.validate(it)
    return items


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


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    runtime = Runtime(settings, metrics)
    keys = KeyRing(settings)
    if not keys.enabled:
        log.warning("FEWSTEP_API_KEYS is not set: the API accepts requests without authentication")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        yield
        await asyncio.to_thread(runtime.close)

    app = FastAPI(title="fewstep", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.runtime, app.state.metrics = settings, runtime, metrics
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    def principal(request: Request) -> str:
        return keys.principal(request.headers.get("authorization"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if runtime.ready:
            return JSONResponse({"status": "ready"})
        reason = runtime.load_error or ("loading" if not runtime.loaded.is_set() else "a model has no working version")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        return ModelList(data=cards)

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def generate_images(req: ImageGenerationRequest, _: str = Depends(principal)) -> ImageGenerationResponse:
        t0 = time.perf_counter()
        items = build_items(req, settings, runtime)
        outcomes = await runtime.generate(req.model, items)
        for o in outcomes:
            if isinstance(o, FewstepError):
                raise o
        results = [o for o in outcomes if isinstance(o, ImageResult)]
        pngs = await asyncio.to_thread(lambda: [encode_png(r.pixels) for r in results])
        served = runtime.served(req.model)
        assert served.engine is not None
        steps = items[0].steps
        metrics.request_seconds.labels(req.model, str(steps)).observe(time.perf_counter() - t0)
        metrics.images.labels(req.model, str(steps)).inc(len(results))
        return ImageGenerationResponse(
            created=int(time.time()),
            model=req.model,
            model_version=served.engine.info.version,
            steps=steps,
            nfe=sum(r.nfe for r in results) // len(results),
            hybrid=req.hybrid,
            size=served.engine.info.size,
            data=[ImageDatum(b64_json=b, seed=r.seed) for b, r in zip(pngs, results, strict=True)],
        )

    return app
