"""OpenAI's Videos API: `POST /v1/videos`, `GET /v1/videos[/{id}]`, `GET /v1/videos/{id}/content`, `DELETE`.

A video is a job of one clip on the queue's video lane (`service/clips.py` makes it), so it has what jobs have:
per-key limits (`key_max_job_cost`, `key_max_stored_jobs`), `Idempotency-Key`, at-least-once delivery, dead
letters, and a result (the MP4) kept `result_ttl_s`. Its owner (the caller's key) alone sees it. OpenAI's statuses
are queued | in_progress | completed | failed: a cancelled video is `failed` with the error code `cancelled`.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from fewstep.engines.base import StreamRequest
from fewstep.engines.mp4 import MEDIA_TYPE, check_even
from fewstep.engines.specs import VideoSpec
from fewstep.errors import Conflict, InvalidRequest, NotFound, RangeNotSatisfiable, limit_error
from fewstep.service.queue.base import ItemResult, JobSpec, JobStatus, fingerprint
from fewstep.service.queue.keys import VIDEO
from fewstep.service.requests import check_prompt, parse
from fewstep.service.routes.images import read_form
from fewstep.service.routes.jobs import IDEMPOTENCY_KEY
from fewstep.service.schemas import Video, VideoCreateRequest, VideoDeleted, VideoError, VideoList
from fewstep.service.settings import Settings
from fewstep.service.state import Gateway, GatewayDep, Owner

router = APIRouter()
RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
STATUS: dict[str, Literal["queued", "in_progress", "completed"]] = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
}
"""OpenAI's status of a job's state; every other state (failed, cancelled) is `failed`."""


@router.post("/v1/videos", response_model=Video)
async def create_video(
    request: Request,
    owner: Owner,
    gw: GatewayDep,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> Video:
    """A clip of `seconds` × the model's frame rate frames, made by its stream engine and encoded to MP4."""
    settings = gw.settings
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise limit_error("Idempotency-Key", "1 to 255 printable ASCII characters", idempotency_key[:300])
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await read_form(request)
        if any(not isinstance(v, str) for v in form.values()):
            raise InvalidRequest("input_reference", "`input_reference` (a reference image) is not served here")
        fields: dict[str, Any] = dict(form.items())
    else:
        try:
            fields = json.loads(await request.body())
        except ValueError as e:
            raise InvalidRequest("body", "the body is neither JSON nor a multipart form") from e
        if not isinstance(fields, dict):
            raise InvalidRequest("body", "the body must be a JSON object")
    body = parse(VideoCreateRequest, fields, settings)
    check_prompt(body.prompt, settings)
    spec = gw.streams.spec(body.model)
    clip, seconds = clip_request(body, spec, gw)
    job = JobSpec(
        owner=owner,
        model=body.model,
        items=[clip],
        lane=VIDEO,
        ttl_s=settings.result_ttl_s,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint(body.model, [body.model_dump()]),
        owner_limit=gw.owner_limit(settings.key_max_job_cost),
        owner_jobs=settings.key_max_stored_jobs,
        costs=[clip.frames * (clip.steps + 1)],
        meta=json.dumps(
            {"prompt": body.prompt, "seconds": seconds, "size": spec.size, "steps": clip.steps, "seed": clip.seed}
        ),
    )
    await gw.spend(owner, "videos")
    video = await video_view(gw, owner, await gw.ask(gw.queue.submit, job))
    if gw.clips is not None:
        gw.clips.nudge()  # this gateway's driver claims it now, not at its next round
    return video


def clip_limits(spec: VideoSpec, settings: Settings) -> tuple[float, int]:
    """The frame rate a clip of the model `spec` describes plays at, and the most frames one clip of it may have
    (`video_max_frames` and the model's own stream bound); `GET /v1/models` reports both."""
    fps = spec.fps or settings.video_fps
    return fps, min(settings.video_max_frames, spec.max_frames or settings.video_max_frames)


def clip_request(body: VideoCreateRequest, spec: VideoSpec, gw: Gateway) -> tuple[StreamRequest, str]:
    """The clip `body` asks of the model `spec` describes, and its `seconds` as the Video object reports them;
    InvalidRequest naming the limit when the model cannot make it."""
    settings = gw.settings
    fps, most = clip_limits(spec, settings)
    try:
        seconds = float(body.seconds)
    except ValueError as e:
        raise limit_error("seconds", "a number of seconds", body.seconds) from e
    frames = spec.frames_near(round(seconds * fps), most) if 0 < seconds < 1e9 else 0
    if not 1 <= round(seconds * fps) <= most:
        rule = f"between {1 / fps:g} and {most / fps:g} ({most} frames at {fps:g} fps, `video_max_frames`)"
        raise limit_error("seconds", rule, body.seconds)
    size = body.size if body.size is not None else spec.size
    if size != spec.size:
        raise limit_error("size", f"{spec.size!r}, the size of {spec.model!r}", size)
    check_even(spec.width, spec.height)
    seed = body.seed if body.seed is not None else secrets.randbelow(1 << 31)
    clip = StreamRequest(body.prompt, frames, body.steps if body.steps is not None else spec.default_steps, seed)
    spec.validate(clip, most)
    return clip, f"{seconds:g}"


@router.get("/v1/videos", response_model=VideoList)
async def list_videos(
    owner: Owner,
    gw: GatewayDep,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: str = "desc",
) -> VideoList:
    if order not in ("asc", "desc"):
        raise limit_error("order", "'asc' or 'desc'", order)
    kept = await gw.ask(gw.queue.jobs, owner, VIDEO)
    if order == "desc":
        kept = kept[::-1]
    ids = [st.id for st in kept]
    start = 0
    if after is not None:
        if after not in ids:
            raise NotFound(f"video {after!r} not found (`after`)")
        start = ids.index(after) + 1
    page = kept[start : start + limit]
    data = [await video_view(gw, owner, st) for st in page]
    return VideoList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=start + limit < len(kept),
    )


@router.get("/v1/videos/{video_id}", response_model=Video)
async def get_video(video_id: str, owner: Owner, gw: GatewayDep, response: Response) -> Video:
    """The video; while it is unfinished, `openai-poll-after-ms` says when to look again."""
    video = await video_view(gw, owner, await gw.ask(gw.queue.status, video_id, owner))
    if video.status in ("queued", "in_progress"):
        response.headers["openai-poll-after-ms"] = str(gw.settings.video_poll_after_ms)
    return video


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
async def delete_video(video_id: str, owner: Owner, gw: GatewayDep) -> VideoDeleted:
    """A queued or running video is cancelled (its session ends at once and frees its row; it then reads `failed`,
    code `cancelled`, until its TTL or a second delete); a finished one is forgotten with its MP4 now."""
    st = await gw.ask(gw.queue.status, video_id, owner)
    if st.settled:
        await gw.ask(gw.queue.forget, video_id, owner)
    else:
        await gw.ask(gw.queue.cancel, video_id, owner)
    return VideoDeleted(id=video_id)


@router.get(
    "/v1/videos/{video_id}/content",
    response_class=Response,
    responses={200: {"content": {MEDIA_TYPE: {}}}, 206: {"content": {MEDIA_TYPE: {}}}},
)
async def video_content(
    video_id: str,
    owner: Owner,
    gw: GatewayDep,
    variant: str = "video",
    range_: str | None = Header(None, alias="Range"),
) -> Response:
    """The MP4 (`variant=video`, the only one made here), or one byte range of it (206; 416 for a range that does
    not parse or lies past its end)."""
    if variant != "video":
        raise limit_error("variant", "'video' (no thumbnail or spritesheet is made here)", variant)
    st = await gw.ask(gw.queue.status, video_id, owner)
    result = await video_result(gw, owner, st)
    if STATUS.get(st.status) != "completed" or result is None or result.b64_json is None:
        raise Conflict(f"video {video_id!r} is {STATUS.get(st.status, 'failed')}: it has no content")
    data = base64.b64decode(result.b64_json)
    headers = {"Accept-Ranges": "bytes"}
    if range_ is None:
        return Response(data, media_type=MEDIA_TYPE, headers=headers)
    first, last = byte_range(range_, len(data))
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return Response(data[first : last + 1], status_code=206, media_type=MEDIA_TYPE, headers=headers)


def byte_range(header: str, size: int) -> tuple[int, int]:
    """The first and last byte (inclusive) of one `bytes=a-b`, `bytes=a-` or `bytes=-n` range of a `size`-byte
    body, cut to its end; `RangeNotSatisfiable` for anything else (several ranges too)."""
    m = RANGE.fullmatch(header.strip())
    if m is None or m.groups() == ("", ""):
        raise RangeNotSatisfiable(f"`Range` must be one range `bytes=first-last`. Given: {header[:80]!r}", size)
    first, last = m.groups()
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(f"`Range` {header[:80]!r} asks for no bytes", size)
        return max(0, size - n), size - 1
    start, end = int(first), size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"`Range` {header[:80]!r} lies outside the video's {size} bytes", size)
    return start, end


async def video_result(gw: Gateway, owner: str, st: JobStatus) -> ItemResult | None:
    """The video's one result, once it has one."""
    if not st.settled:
        return None
    results = await gw.ask(gw.queue.results, st.id, owner)
    return results[0] if results else None


async def video_view(gw: Gateway, owner: str, st: JobStatus) -> Video:
    """The job `st` as OpenAI's Video object."""
    meta = json.loads(st.meta or "{}")
    status = STATUS.get(st.status, "failed")
    error = None
    if status == "failed":
        if st.status == "cancelled":
            error = VideoError(code="cancelled", message="the video was deleted (cancelled) before it finished")
        else:
            result = await video_result(gw, owner, st)
            message = result.error if result is not None and result.error else "the video failed"
            error = VideoError(code="generation_failed", message=message)
    return Video(
        id=st.id,
        status=status,
        progress=100 if status == "completed" else st.progress,
        created_at=int(st.created),
        completed_at=int(st.finished) if st.finished is not None else None,
        expires_at=int(st.expires) if st.expires is not None else None,
        error=error,
        model=st.model,
        prompt=meta.get("prompt"),
        seconds=str(meta.get("seconds", "")),
        size=str(meta.get("size", "")),
        steps=meta.get("steps"),
        seed=meta.get("seed"),
    )
