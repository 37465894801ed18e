"""`GET /healthz` (alive), `GET /readyz` (models loaded and the queue reachable), `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fewstep.errors import NotReady
from fewstep.service.state import GatewayDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: GatewayDep) -> JSONResponse:
    if gw.drain.draining.is_set():
        return JSONResponse({"status": "not ready", "reason": "shutting down"}, status_code=503)
    images = gw.images
    if not images.ready:
        # The load error itself (with server paths) is in the log, not on this unauthenticated route.
        if images.load_error is not None:
            reason = "a model failed to load: the server's log says why"
        else:
            reason = "loading" if not images.loaded.is_set() else "a model has no working version"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    if not gw.streams.ready:
        return JSONResponse({"status": "not ready", "reason": "video models are loading"}, status_code=503)
    try:
        await gw.ask(gw.queue.ping)
    except NotReady as e:
        return JSONResponse({"status": "not ready", "reason": str(e)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(gw: GatewayDep) -> Response:
    body = await gw.call(generate_latest, gw.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
