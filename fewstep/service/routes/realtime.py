"""`WS /v1/images/stream`: real-time image-to-image, a camera feed or a drawing restyled as it comes.

The client's first message is `{"model", "prompt", "strength", "steps", "seed", "size", "format"}` (+ `"api_key"`
when auth is on and no header was sent): `strength` (default 0.5) and `steps` (default: the model's edit steps
at that strength) say how much of each frame is made anew, `seed` (default random) is the session's, so that
still frames stay still, `size` (WxH) is the frames' size (default: the first frame's, made one the model
serves), `format` `jpeg` (default) or `png` is what comes back. The server answers `{"type": "ready", …}`.

Then the client sends frames as binary messages (PNG, JPEG or WebP; at most `realtime_max_frame_bytes`, bounded
as uploads are) and, whenever it likes, `{"type": "prompt", "prompt", "strength"?}` for the frames after the
one in progress. For each frame it serves the server sends `{"type": "frame", "index", "dropped", "ms"}` then
the image as a binary message: `index` counts the client's frames from 0, `dropped` how many were skipped so
far, `ms` the time from the frame's arrival to its answer.

Newest wins: one frame of a session is in work at a time; a frame that arrives while another waits replaces
it, and the replaced one is dropped and counted (`fewstep_realtime_frames{outcome="dropped"}`): a client that
sends faster than it is served sees the latest picture, never a growing lag. Each frame is an edit item on the
interactive lane, so sessions share step-level batches with each other and with every other image request,
under the same per-key cost limit. A frame that does not decode gets an error message and the session goes on;
a protocol fault (a text frame that is not a prompt change, a frame over the limit) ends it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from fewstep.engines.base import ImageItem
from fewstep.engines.specs import ImageSpec
from fewstep.errors import FewstepError, InvalidRequest, Overloaded, limit_error
from fewstep.service import errors
from fewstep.service.requests import check_prompt, json_object, parse, parse_size
from fewstep.service.routes.images import edit_size, image_spec, submit, wait_settled
from fewstep.service.routes.sockets import WS_MESSAGE_TOO_BIG, handshake, too_big
from fewstep.service.state import Gateway
from fewstep.service.uploads import edit_start

router = APIRouter()
log = logging.getLogger("fewstep.service")
SESSION_LEASE_S = 120.0
"""A session's per-key lease lasts this long unless renewed (every third of it), so a dead gateway's sessions stop
counting against their key within two minutes."""


class RealtimeStart(BaseModel):
    """The first message of `WS /v1/images/stream`."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr
    strength: StrictFloat | StrictInt = 0.5
    steps: StrictInt | None = None
    seed: StrictInt | None = None
    size: StrictStr | None = None
    format: Literal["jpeg", "png"] = "jpeg"
    api_key: StrictStr | None = None


class RealtimeChange(BaseModel):
    """A message mid-session: the frames after the one in progress follow `prompt` (and `strength`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["prompt"]
    prompt: StrictStr
    strength: StrictFloat | StrictInt | None = None


@dataclass
class Session:
    """One client's real-time session: what its next frame is made with, and the newest frame waiting."""

    model: str
    spec: ImageSpec
    item: ImageItem
    """The frames' item, its image left out: prompt, seed, steps, strength, size."""
    format: str
    waiting: tuple[int, bytes, float] | None = None
    """(index, bytes, arrival) of the frame to serve next."""
    received: int = 0
    dropped: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


async def _fail(gw: Gateway, ws: WebSocket, e: FewstepError) -> None:
    code = errors.ws_close_code(e)
    log.info("image stream closed %d: %s: %s", code, type(e).__name__, e)
    await ws.send_json({"type": "error", "message": str(e), "code": type(e).__name__})
    await ws.close(code=code)


def start_session(gw: Gateway, msg: dict[str, Any]) -> Session:
    """The session a first message asks for; InvalidRequest (or NotFound, NotReady) naming what is wrong."""
    settings = gw.settings
    start = parse(RealtimeStart, msg, settings)
    check_prompt(start.prompt, settings)
    spec = image_spec(gw, start.model)
    strength = float(start.strength)
    if not 0.0 < strength <= 1.0:
        raise limit_error("strength", "a number in (0, 1]", start.strength)
    steps = start.steps if start.steps is not None else spec.edit_steps(strength)
    spec.check_steps(steps)
    width, height = (None, None) if start.size is None else parse_size(start.size)
    seed = start.seed if start.seed is not None else secrets.randbelow(1 << 31)
    item = ImageItem(start.prompt, seed, steps, width=width, height=height, image="", strength=strength)
    spec.validate(item)  # the rules an edit meets (its image comes with each frame)
    return Session(start.model, spec, item, start.format)


def change(session: Session, raw: str, gw: Gateway) -> None:
    """Apply a prompt change to the session's next frames; InvalidRequest when it is not one."""
    msg = json_object(raw, "messages")
    if msg.get("type") != "prompt":
        raise InvalidRequest("type", f"a text message must be {{'type': 'prompt', 'prompt': …}}. Given: {raw[:100]!r}")
    new = parse(RealtimeChange, msg, gw.settings)
    check_prompt(new.prompt, gw.settings)
    strength = session.item.strength if new.strength is None else float(new.strength)
    item = replace(session.item, prompt=new.prompt, strength=strength)
    session.spec.validate(item)
    session.item = item


async def _listen(ws: WebSocket, session: Session, gw: Gateway) -> None:
    """The client's messages: frames (newest wins) and prompt changes. Returns when the client leaves; raises on a
    protocol fault."""
    limit = gw.settings.realtime_max_frame_bytes
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            if len(data) > limit:
                await ws.close(code=WS_MESSAGE_TOO_BIG)
                return
            if session.waiting is not None:  # newest wins: the waiting frame is skipped
                session.dropped += 1
                gw.metrics.realtime_frames.labels(session.model, "dropped").inc()
            session.waiting = (session.received, data, time.perf_counter())
            session.received += 1
            session.arrived.set()
        elif text is not None:
            if too_big(text, gw.settings.ws_max_bytes):
                await ws.close(code=WS_MESSAGE_TOO_BIG)
                return
            change(session, text, gw)


async def serve_frame(gw: Gateway, owner: str, session: Session, data: bytes) -> bytes:
    """One frame made: decoded and bounded as an upload, sized, run as an edit item; the answer's bytes."""
    settings = gw.settings
    target = edit_size(session.spec, (session.item.width, session.item.height) if session.item.width else None)
    b64, w, h = await asyncio.to_thread(edit_start, data, "frame", settings.upload_max_pixels, target)
    item = replace(session.item, image=b64, width=w, height=h)
    job_id = await submit(gw, owner, session.model, session.spec, [item])
    if await wait_settled(gw, job_id, settings.request_timeout_s, None) != "done":
        await gw.ask(gw.queue.cancel, job_id, owner)
        raise InvalidRequest("frame", f"the frame took longer than `request_timeout_s` = {settings.request_timeout_s}")
    [result] = await gw.ask(gw.queue.results, job_id, owner)
    await gw.ask(gw.queue.forget, job_id, owner)
    if result.outcome != "ok" or result.b64_json is None:
        raise InvalidRequest("frame", f"the frame failed: {result.error or result.outcome}")
    png = base64.b64decode(result.b64_json)
    return png if session.format == "png" else await asyncio.to_thread(to_jpeg, png)


def to_jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@router.websocket("/v1/images/stream")
async def image_stream(ws: WebSocket) -> None:
    gw: Gateway = ws.app.state.gateway
    settings = gw.settings
    opened = await handshake(ws, gw, "image stream", lambda e: _fail(gw, ws, e))
    if opened is None:
        return
    owner, msg = opened
    try:
        session = start_session(gw, msg)
        await gw.spend(owner, "image streams")
        cap = settings.key_max_realtime_sessions
        lease = await gw.hold(owner, "image streams", cap, SESSION_LEASE_S, "key_max_realtime_sessions")
    except FewstepError as e:
        await _fail(gw, ws, e)
        return
    it = session.item
    size = None if it.width is None else f"{it.width}x{it.height}"
    ready = {"model": session.model, "steps": it.steps, "strength": it.strength, "seed": it.seed, "size": size}
    listener = asyncio.create_task(_listen(ws, session, gw))
    t0 = time.monotonic()
    renewed_at = t0
    try:
        await ws.send_json({"type": "ready", **ready, "format": session.format})
        while True:
            if time.monotonic() - t0 > settings.realtime_max_session_s:
                limit = f"`realtime_max_session_s` = {settings.realtime_max_session_s}"
                await _fail(gw, ws, InvalidRequest("session", f"the session lasted longer than {limit}"))
                return
            if time.monotonic() - renewed_at >= SESSION_LEASE_S / 3:
                renewed_at = time.monotonic()
                await gw.renew(lease)
            waiter = asyncio.ensure_future(session.arrived.wait())
            done, _ = await asyncio.wait({waiter, listener}, timeout=SESSION_LEASE_S / 3, return_when="FIRST_COMPLETED")
            if listener in done:
                waiter.cancel()
                bad = listener.exception()
                if isinstance(bad, FewstepError):
                    await _fail(gw, ws, bad)
                return  # the client left (or broke the protocol)
            if session.waiting is None:
                continue
            session.arrived.clear()
            (index, data, arrived), session.waiting = session.waiting, None
            try:
                out = await serve_frame(gw, owner, session, data)
            except (InvalidRequest, Overloaded) as e:  # this frame's fault, or no room for it now: the session goes on
                gw.metrics.realtime_frames.labels(session.model, "failed").inc()
                await ws.send_json({"type": "error", "index": index, "message": str(e), "code": type(e).__name__})
                continue
            ms = (time.perf_counter() - arrived) * 1000
            await ws.send_json({"type": "frame", "index": index, "dropped": session.dropped, "ms": round(ms, 1)})
            await ws.send_bytes(out)
            gw.metrics.realtime_frames.labels(session.model, "served").inc()
            gw.metrics.realtime_seconds.labels(session.model).observe(ms / 1000)
    except FewstepError as e:  # the queue refused the frame (full, over the key's limit) or went away
        await _fail(gw, ws, e)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left mid-send
    finally:
        listener.cancel()
        await gw.release(lease)
