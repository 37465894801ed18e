"""`POST /v1/images/generations`: OpenAI's Images API, served as a small job on the interactive lane."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from fewstep.engines.specs import ImageSpec
from fewstep.errors import Cancelled, GenerationFailed, NotReady
from fewstep.service.queue.base import JobSpec
from fewstep.service.queue.keys import INTERACTIVE, SYNC_RESULT_TTL_S
from fewstep.service.requests import build_items
from fewstep.service.schemas import ImageDatum, ImageGenerationRequest, ImageGenerationResponse
from fewstep.service.state import Gateway, GatewayDep, Owner

router = APIRouter()


def image_spec(gw: Gateway, model: str) -> ImageSpec:
    """The serving spec of an image model (NotFound, NotReady)."""
    spec = gw.images.spec(model)
    assert isinstance(spec, ImageSpec)
    return spec


async def wait_settled(gw: Gateway, job_id: str, timeout: float, request: Request) -> str:
    """Wait for a job's end event: "done", "timeout", or "gone" (the client disconnected)."""
    deadline = time.monotonic() + timeout
    cursor = "0"
    while (left := deadline - time.monotonic()) > 0:
        # One waiter for the whole wait (the client's presence is asked every quarter second meanwhile):
        # a waiter made anew each time interrupted the hub's shared read four times a second per request.
        events = await gw.events.next(job_id, cursor, left, gone=request.is_disconnected)
        if events:
            cursor = events[-1].cursor
            if any(e.kind == "end" for e in events):
                return "done"
        elif await request.is_disconnected():
            return "gone"
    return "timeout"


@router.post("/v1/images/generations", response_model=ImageGenerationResponse)
async def generate_images(
    req: ImageGenerationRequest, request: Request, owner: Owner, gw: GatewayDep
) -> ImageGenerationResponse:
    t0 = time.perf_counter()
    settings = gw.settings
    spec = image_spec(gw, req.model)
    items = build_items(req, spec, settings)
    await gw.spend(owner, "image requests")
    ttl = max(SYNC_RESULT_TTL_S, int(settings.request_timeout_s) + 60)
    costs = [spec.nfe(it) for it in items]
    cap = gw.owner_limit(settings.key_max_sync_cost)
    submitted = JobSpec(owner, req.model, items, INTERACTIVE, ttl, owner_limit=cap, costs=costs)
    job = await gw.ask(gw.queue.submit, submitted)
    outcome = await wait_settled(gw, job.id, settings.request_timeout_s, request)
    if outcome != "done":
        await gw.ask(gw.queue.cancel, job.id, owner)  # its items leave the running batch at the next step
        if outcome == "gone":
            raise Cancelled("the client disconnected")
        raise NotReady(f"request took longer than `request_timeout_s` = {settings.request_timeout_s}")
    results = await gw.ask(gw.queue.results, job.id, owner)
    await gw.ask(gw.queue.forget, job.id, owner)  # its caller has the images: nobody reads them again
    for r in results:
        if r.outcome == "cancelled":
            raise Cancelled(r.error or "cancelled")
        if r.outcome != "ok":
            raise GenerationFailed(r.error or "generation failed")
    steps = items[0].steps
    gw.metrics.request_seconds.labels(req.model, str(steps)).observe(time.perf_counter() - t0)
    gw.metrics.images.labels(req.model, str(steps)).inc(len(results))
    return ImageGenerationResponse(
        created=int(time.time()),
        model=req.model,
        model_version=results[0].model_version or "",
        steps=steps,
        nfe=sum(r.nfe for r in results) // len(results),
        hybrid=req.hybrid,
        size=f"{items[0].width or spec.width}x{items[0].height or spec.height}",
        data=[ImageDatum(b64_json=r.b64_json or "", seed=r.seed) for r in results],
    )
