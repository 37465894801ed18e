"""`WS /v1/video/stream`: one stream per WebSocket.

The client's first message is `{"model", "prompt", "frames", "steps", "seed", "hybrid"}` (+ `"api_key"`
when auth is on and no header was sent). The server sends `{"type": "frame", "index", "image"}` per
frame, then `{"type": "done", "frames", …}`. `{"type": "prompt", "prompt"}` from the client steers the
frames after the one in progress. Bad input: an error message, then close 1008; over capacity (or not
loaded yet): an error message, then close 1013; a server fault closes 1011. A client that goes away
frees its session's row at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from fewstep.engines.base import Frame, StreamRequest
from fewstep.errors import FewstepError, InvalidRequest, Overloaded
from fewstep.service import errors
from fewstep.service.requests import prompt_change, stream_start
from fewstep.service.routes.sockets import WS_MESSAGE_TOO_BIG, handshake, too_big
from fewstep.service.state import Gateway
from fewstep.service.streams import Stream, VideoStreams

router = APIRouter()
log = logging.getLogger("fewstep.service")
WS_GOING_AWAY = 1001
SESSION_LEASE_S = 120.0
"""A session's per-key lease lasts this long unless renewed (every third of it while frames flow), so the
sessions of a gateway that died stop counting against their key within two minutes."""


def refusal(e: FewstepError) -> str:
    """How a refused session is counted: `invalid` (the client's fault) or `unavailable`."""
    return "invalid" if errors.ws_close_code(e) == errors.WS_POLICY_VIOLATION else "unavailable"


async def _fail(gw: Gateway, ws: WebSocket, e: FewstepError, reason: str | None) -> None:
    """Send the error, then close with its code; count a refused session under `reason`. One log line."""
    if reason is not None:
        gw.metrics.video_rejected.labels(reason).inc()
    code = errors.ws_close_code(e)
    log.info("video stream closed %d: %s: %s", code, type(e).__name__, e)
    await ws.send_json({"type": "error", "message": str(e), "code": type(e).__name__})
    await ws.close(code=code)


@router.websocket("/v1/video/stream")
async def video_stream(ws: WebSocket) -> None:
    gw: Gateway = ws.app.state.gateway
    settings, streams = gw.settings, gw.streams
    opened = await handshake(ws, gw, "video stream", lambda e: _fail(gw, ws, e, refusal(e)))
    if opened is None:
        return
    owner, msg = opened
    loop = asyncio.get_running_loop()
    try:
        start = stream_start(msg, settings)
        spec = streams.spec(start.model)
        steps = start.steps if start.steps is not None else spec.default_steps
        seed = start.seed if start.seed is not None else secrets.randbelow(1 << 31)
        request = StreamRequest(start.prompt, start.frames, steps, seed, start.hybrid)
        spec.validate(request, settings.video_max_frames)
        await gw.spend(owner, "video sessions")
        cap = settings.key_max_video_sessions
        lease = await gw.hold(owner, "video sessions", cap, SESSION_LEASE_S, "key_max_video_sessions")
    except FewstepError as e:
        await _fail(gw, ws, e, refusal(e))
        return
    queue: asyncio.Queue[tuple[Frame | None, str]] = asyncio.Queue()

    def deliver(frame: Frame | None, png: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (frame, png))

    t0 = time.perf_counter()
    try:
        stream = await asyncio.to_thread(streams.open, start.model, request, deliver)
    except FewstepError as e:
        await gw.release(lease)
        await _fail(gw, ws, e, None if isinstance(e, Overloaded) else "invalid")  # capacity: counted by `open`
        return
    listener = asyncio.create_task(_listen(ws, streams, stream, gw, owner))
    ended = False

    async def end() -> None:
        """Free the session's row (waiting for the step in progress: off the event loop) and the key's lease."""
        nonlocal ended
        if ended:
            return
        ended = True
        listener.cancel()
        try:
            await asyncio.to_thread(streams.close_stream, stream)
        finally:
            await gw.release(lease)

    sent = 0
    renewed_at = time.monotonic()
    try:
        while sent < request.frames:
            if time.perf_counter() - t0 > settings.video_max_session_s:
                limit = f"`video_max_session_s` = {settings.video_max_session_s}"
                await _fail(gw, ws, InvalidRequest("frames", f"the session lasted longer than {limit}"), None)
                return
            if time.monotonic() - renewed_at >= SESSION_LEASE_S / 3:
                renewed_at = time.monotonic()
                await gw.renew(lease)
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                bad = listener.exception()
                if isinstance(bad, FewstepError):
                    await _fail(gw, ws, bad, None)
                return  # the client left (or broke the protocol): `finally` frees the row
            frame, png = getter.result()
            if frame is None:
                await ws.close(code=errors.WS_INTERNAL_ERROR)
                return
            await ws.send_json({"type": "frame", "index": frame.index, "image": png})
            streams.sent(stream)
            gw.metrics.video_frames.labels(stream.model).inc()
            sent += 1
            if gw.drain.draining.is_set() and sent < request.frames:
                await ws.close(code=WS_GOING_AWAY, reason="server shutting down")  # after the frame in progress
                return
        elapsed = time.perf_counter() - t0
        # The row and the key's lease are free before the client hears "done": its next session never finds
        # them still held by this one.
        await end()
        await ws.send_json(
            {
                "type": "done",
                "frames": sent,
                "model": stream.model,
                "model_version": stream.engine.spec.version,
                "steps": steps,
                "seed": seed,
                "hybrid": request.hybrid,
                "prompt": stream.session.prompt,
                "seconds": round(elapsed, 3),
                "fps": round(sent / elapsed, 2) if elapsed > 0 else None,
            }
        )
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left mid-send
    finally:
        await end()


async def _listen(ws: WebSocket, streams: VideoStreams, stream: Stream, gw: Gateway, owner: str) -> None:
    """Client messages during a stream: prompt changes, at most `video_prompt_changes_per_s` (bursts of
    `video_prompt_change_burst`) per key; returns when the client leaves, raises on bad input."""
    s = gw.settings
    # Per key; without keys, per session (every client is the one "anonymous" owner then).
    who = owner if gw.keyed else f"session:{id(stream)}"
    budget = (who, "prompt changes", s.video_prompt_changes_per_s, s.video_prompt_change_burst)
    names = "`video_prompt_changes_per_s`, `video_prompt_change_burst`"
    while True:
        try:
            raw = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return
        except KeyError as e:  # a binary message
            raise InvalidRequest("message", "messages must be JSON text") from e
        if too_big(raw, s.ws_max_bytes):
            await ws.close(code=WS_MESSAGE_TOO_BIG)
            return
        prompt = prompt_change(raw, gw.settings)
        await gw.call(gw.limits.spend, *budget, names)
        await asyncio.to_thread(streams.steer, stream, prompt)
