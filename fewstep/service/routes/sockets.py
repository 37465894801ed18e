"""What every WebSocket route does before its own protocol: the origin check, the key (from the `Authorization`
header before the socket is accepted, or from the first message's `api_key`), and the first message read within
its time and size limits. Used by `WS /v1/video/stream` and `WS /v1/images/stream`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import WebSocket, WebSocketDisconnect

from fewstep.errors import FewstepError, InvalidRequest
from fewstep.service import errors
from fewstep.service.requests import json_object
from fewstep.service.state import Gateway, authenticate

log = logging.getLogger("fewstep.service")
WS_MESSAGE_TOO_BIG = 1009


def too_big(text: str, limit: int) -> bool:
    """Whether a text message is over `limit` bytes (`ws_max_bytes`): the socket layer's own bound is the larger
    one real-time frames need, so text is bounded here, before it is parsed."""
    return len(text) > limit or len(text.encode()) > limit


Fail = Callable[[FewstepError], Awaitable[None]]
"""Sends an error to the accepted socket and closes it (each route counts its refusals its own way)."""


def same_origin_or_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """A browser's `Origin` must be this gateway's own (the playground) or in `ws_allowed_origins`; clients
    that send none (not browsers) pass: the key is what guards them."""
    origin = ws.headers.get("origin")
    if origin is None or origin in allowed or "*" in allowed:
        return True
    return urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()


async def handshake(ws: WebSocket, gw: Gateway, what: str, fail: Fail) -> tuple[str, dict[str, Any]] | None:
    """Accept `ws` and read its first message: (the caller's owner id, the message as a JSON object), or None once
    the socket is refused or closed (an error was sent where the socket was accepted). `what` names the route
    in logs."""
    settings = gw.settings
    if not same_origin_or_allowed(ws, settings.ws_allowed_origins):
        log.info("%s refused before accept: origin %r is not allowed", what, ws.headers.get("origin", "")[:200])
        await ws.close(code=errors.WS_POLICY_VIOLATION)  # before accept: the handshake gets 403
        return None
    header = ws.headers.get("authorization")
    address = ws.client.host if ws.client else ""
    owner: str | None = None
    if header:  # the key is checked before the socket is accepted
        try:
            owner = await asyncio.to_thread(authenticate, gw, header, address)
        except FewstepError as e:
            log.info("%s refused before accept: %s", what, e)
            await ws.close(code=errors.ws_close_code(e))
            return None
    await ws.accept()
    try:
        raw = await asyncio.wait_for(ws.receive_text(), settings.video_first_message_s)
    except TimeoutError:
        limit = f"`video_first_message_s` = {settings.video_first_message_s} s"
        await fail(InvalidRequest("message", f"no first message within {limit}"))
        return None
    except WebSocketDisconnect:
        return None  # gone before asking for anything
    except KeyError:  # Starlette's sign of a binary message
        await fail(InvalidRequest("message", "the first message must be JSON text, not binary"))
        return None
    if too_big(raw, settings.ws_max_bytes):
        await ws.close(code=WS_MESSAGE_TOO_BIG)
        return None
    try:
        if owner is None and gw.keys.enabled and len(raw) > settings.ws_first_message_bytes:
            # Not authenticated yet: no more than a start message is read from an unknown client.
            limit = f"`ws_first_message_bytes` = {settings.ws_first_message_bytes}"
            raise InvalidRequest("message", f"a first message without an Authorization header is over {limit}")
        msg = json_object(raw, "the first message")
        if owner is None:  # no header: the key is in the first message, checked before its fields
            key = msg.get("api_key") if isinstance(msg.get("api_key"), str) else None
            owner = await asyncio.to_thread(authenticate, gw, f"Bearer {key}" if key else None, address)
    except FewstepError as e:
        await fail(e)
        return None
    return owner, msg
