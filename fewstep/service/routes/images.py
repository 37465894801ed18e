"""`POST /v1/images/generations`: OpenAI's Images API, served as a small job on the interactive lane."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from fewstep.engines.base import ImageItem
from fewstep.engines.specs import ImageSpec
from fewstep.errors import Cancelled, GenerationFailed, InvalidRequest, NotReady, limit_error
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
    spec = image_spec(gw, req.model)
    items = build_items(req, spec, gw.settings)
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
async def edit_images(request: Request, owner: Owner, gw: GatewayDep) -> ImageGenerationResponse:
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
    await gw.spend(owner, "image requests")
    ttl = max(SYNC_RESULT_TTL_S, int(settings.request_timeout_s) + 60)
    costs = [spec.nfe(it) for it in items]
    cap = gw.owner_limit(settings.key_max_sync_cost)
    submitted = JobSpec(owner, model, items, INTERACTIVE, ttl, owner_limit=cap, costs=costs)
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
