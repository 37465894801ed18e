"""OpenAI's Images API: `POST /v1/images/generations` and `/v1/images/edits`, each served as a small job on the
interactive lane, answered whole or streamed (Server-Sent Events with partial images)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from fewstep.engines.base import ImageItem
from fewstep.engines.specs import ImageSpec
from fewstep.errors import Cancelled, FewstepError, GenerationFailed, InvalidRequest, NotReady, limit_error
from fewstep.service import errors
from fewstep.service.events import sse
from fewstep.service.queue.base import JobSpec
from fewstep.service.queue.keys import INTERACTIVE, SYNC_RESULT_TTL_S
from fewstep.service.requests import build_items, parse, parse_size
from fewstep.service.schemas import ImageDatum, ImageEditRequest, ImageGenerationRequest, ImageGenerationResponse
from fewstep.service.state import Gateway, GatewayDep, Owner
from fewstep.service.uploads import edit_start, snap

router = APIRouter()


def image_spec(gw: Gateway, model: str) -> ImageSpec:
    """The serving spec of an image model (NotFound, NotReady)."""
    spec = gw.images.spec(model)
    assert isinstance(spec, ImageSpec)
    return spec


async def wait_settled(gw: Gateway, job_id: str, timeout: float, request: Request | None) -> str:
    """Wait for a job's end event: "done", "timeout", or "gone" (the client disconnected; `request` None: a
    caller that watches its client itself)."""
    deadline = time.monotonic() + timeout
    cursor = "0"
    gone = request.is_disconnected if request is not None else None
    while (left := deadline - time.monotonic()) > 0:
        # One waiter for the whole wait (the client's presence is asked every quarter second meanwhile):
        # a waiter made anew each time interrupted the hub's shared read four times a second per request.
        events = await gw.events.next(job_id, cursor, left, gone=gone)
        if events:
            cursor = events[-1].cursor
            if any(e.kind == "end" for e in events):
                return "done"
        elif gone is not None and await gone():
            return "gone"
    return "timeout"


@router.post("/v1/images/generations", response_model=ImageGenerationResponse)
async def generate_images(
    req: ImageGenerationRequest, request: Request, owner: Owner, gw: GatewayDep
) -> ImageGenerationResponse | StreamingResponse:
    t0 = time.perf_counter()
    spec = image_spec(gw, req.model)
    items = build_items(req, spec, gw.settings)
    if req.stream:
        return await stream_images(gw, owner, req.model, spec, items, "image_generation", request)
    return await make_images(gw, owner, req.model, spec, items, req.hybrid, request, t0)


EDIT_FIELDS = ("model", "prompt", "n", "size", "response_format", "steps", "seed", "strength", "guidance_scale")
EDIT_FORM = {
    "type": "object",
    "required": ["image", "prompt", "model"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{k: {"type": "string"} for k in EDIT_FIELDS},
    },
}


@router.post(
    "/v1/images/edits",
    response_model=ImageGenerationResponse,
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": EDIT_FORM}}, "required": True}},
)
async def edit_images(request: Request, owner: Owner, gw: GatewayDep) -> ImageGenerationResponse | StreamingResponse:
    """OpenAI's image edits: each uploaded image restyled by the prompt (img2img), `n` results per image."""
    t0 = time.perf_counter()
    settings = gw.settings
    form = await read_form(request)
    try:
        req = parse(ImageEditRequest, {k: v for k, v in form.items() if isinstance(v, str)}, settings)
        spec = image_spec(gw, req.model)
        if "mask" in form:
            raise InvalidRequest("mask", "`mask` (inpainting) is not served: no family here has an inpainting path")
        files = [f for key in ("image", "image[]") for f in form.getlist(key)]
        if not files or not all(isinstance(f, UploadFile) for f in files):
            raise limit_error("image", "one or more image files (multipart `image` or `image[]`)", len(files))
        if len(files) > settings.max_n:
            raise limit_error("image", f"at most {settings.max_n} images (`max_n`)", len(files))
        size = None if req.size in (None, "auto") else parse_size(req.size)
        target = edit_size(spec, size)
        starts = []
        for f in files:
            assert isinstance(f, UploadFile)
            data = await f.read()
            starts.append(await asyncio.to_thread(edit_start, data, "image", settings.upload_max_pixels, target))
    finally:
        await form.close()  # the uploads' spooled files
    req = req.model_copy(update={"size": None})  # each start carries its own size
    items = build_items(req, spec, settings, starts=starts)
    if req.stream:
        return await stream_images(gw, owner, req.model, spec, items, "image_edit", request)
    return await make_images(gw, owner, req.model, spec, items, False, request, t0)


async def read_form(request: Request) -> Any:
    """The multipart form, its body already bounded by `upload_max_bytes`; InvalidRequest when it is not one."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("body", "`POST /v1/images/edits` takes multipart/form-data (images and fields)")
    try:
        return await request.form(max_files=64, max_fields=64, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as e:  # starlette answers a bad form with its own 400
        why = getattr(e, "detail", None) or getattr(e, "message", "")
        raise InvalidRequest("body", f"the multipart form does not parse ({str(why)[:80]})") from e


def edit_size(spec: ImageSpec, size: tuple[int | None, int | None] | None) -> Callable[[int, int], tuple[int, int]]:
    """The size an edit of a w × h upload is made at: the request's `size`, else the upload's own size made one
    the model serves (cut to its multiple, within its sides), else the model's native size."""

    def target(w: int, h: int) -> tuple[int, int]:
        if size is not None and size[0] is not None and size[1] is not None:
            return size[0], size[1]
        if spec.sizes is not None:
            return snap(w, h, spec.sizes.low, spec.sizes.high, spec.sizes.multiple)
        return spec.width, spec.height

    return target


async def make_images(
    gw: Gateway,
    owner: str,
    model: str,
    spec: ImageSpec,
    items: list[ImageItem],
    hybrid: bool,
    request: Request,
    t0: float,
) -> ImageGenerationResponse:
    """Run validated items as one small job on the interactive lane and answer with their images."""
    settings = gw.settings
    job_id = await submit(gw, owner, model, spec, items)
    outcome = await wait_settled(gw, job_id, settings.request_timeout_s, request)
    if outcome != "done":
        await gw.ask(gw.queue.cancel, job_id, owner)  # its items leave the running batch at the next step
        if outcome == "gone":
            raise Cancelled("the client disconnected")
        raise NotReady(f"request took longer than `request_timeout_s` = {settings.request_timeout_s}")
    results = await gw.ask(gw.queue.results, job_id, owner)
    await gw.ask(gw.queue.forget, job_id, owner)  # its caller has the images: nobody reads them again
    for r in results:
        if r.outcome == "cancelled":
            raise Cancelled(r.error or "cancelled")
        if r.outcome != "ok":
            raise GenerationFailed(r.error or "generation failed")
    steps = items[0].steps
    gw.metrics.request_seconds.labels(model, str(steps)).observe(time.perf_counter() - t0)
    gw.metrics.images.labels(model, str(steps)).inc(len(results))
    return ImageGenerationResponse(
        created=int(time.time()),
        model=model,
        model_version=results[0].model_version or "",
        steps=steps,
        nfe=sum(r.nfe for r in results) // len(results),
        hybrid=hybrid,
        size=f"{items[0].width or spec.width}x{items[0].height or spec.height}",
        data=[ImageDatum(b64_json=r.b64_json or "", seed=r.seed) for r in results],
    )


async def submit(gw: Gateway, owner: str, model: str, spec: ImageSpec, items: list[ImageItem]) -> str:
    """Queue validated items as one small job on the interactive lane, charged to `owner`; its id."""
    settings = gw.settings
    await gw.spend(owner, "image requests")
    ttl = max(SYNC_RESULT_TTL_S, int(settings.request_timeout_s) + 60)
    costs = [spec.cost(it) for it in items]
    cap = gw.owner_limit(settings.key_max_sync_cost)
    submitted = JobSpec(owner, model, items, INTERACTIVE, ttl, owner_limit=cap, costs=costs)
    job = await gw.ask(gw.queue.submit, submitted)
    return job.id


async def stream_images(
    gw: Gateway, owner: str, model: str, spec: ImageSpec, items: list[ImageItem], kind: str, request: Request
) -> StreamingResponse:
    """OpenAI's streamed images: Server-Sent Events `{kind}.partial_image` as the steps make them (each the decoded
    x0 estimate after a step, `partial_image_index` counting per image), then `{kind}.completed` for each image
    in order, whose pixels are the unstreamed request's; `error` (OpenAI's error shape) if an image fails or the
    request runs past `request_timeout_s`. The job is queued before the response starts, so a refusal (a full
    lane, a key over its limit) is an HTTP status, not an event. Extra fields: `index` (which image of the
    request), `seed`."""
    t0 = time.perf_counter()
    job_id = await submit(gw, owner, model, spec, items)
    size = {i: f"{it.width or spec.width}x{it.height or spec.height}" for i, it in enumerate(items)}

    def shape(data: str, i: int) -> dict[str, Any]:
        return {"b64_json": data, "created_at": int(time.time()), "size": size[i], "quality": "auto",
                "background": "opaque", "output_format": "png", "index": i, "seed": items[i].seed}  # fmt: skip

    async def frames() -> AsyncIterator[str]:
        settled = False
        try:
            deadline = time.monotonic() + gw.settings.request_timeout_s
            cursor = "0"
            while (left := deadline - time.monotonic()) > 0:
                events = await gw.events.next(job_id, cursor, left, gone=request.is_disconnected)
                for e in events:
                    cursor = e.cursor
                    if e.kind == "partial" and e.index is not None and e.data is not None:
                        body = {
                            "type": f"{kind}.partial_image",
                            **shape(e.data, e.index),
                            "partial_image_index": e.partial,
                        }
                        yield sse(f"{kind}.partial_image", body)
                if any(e.kind == "end" for e in events):
                    settled = True
                    break
                if not events and await request.is_disconnected():
                    return
            if not settled:
                msg = f"request took longer than `request_timeout_s` = {gw.settings.request_timeout_s}"
                yield sse("error", errors.error_body(msg, "NotReady", None, 503))
                return
            results = await gw.ask(gw.queue.results, job_id, owner)
            await gw.ask(gw.queue.forget, job_id, owner)
            for r in results:
                if r.outcome != "ok":
                    code = "Cancelled" if r.outcome == "cancelled" else "GenerationFailed"
                    yield sse("error", errors.error_body(r.error or r.outcome, code, None, 500))
                    return
                made = {"model_version": r.model_version, "steps": r.steps, "nfe": r.nfe}
                body = {"type": f"{kind}.completed", **shape(r.b64_json or "", r.index), **made}
                yield sse(f"{kind}.completed", body)
            steps = items[0].steps
            gw.metrics.request_seconds.labels(model, str(steps)).observe(time.perf_counter() - t0)
            gw.metrics.images.labels(model, str(steps)).inc(len(results))
        finally:
            if not settled:  # the client left or the time ran out: the items leave the batch at the next step
                with contextlib.suppress(FewstepError):
                    await gw.ask(gw.queue.cancel, job_id, owner)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)
