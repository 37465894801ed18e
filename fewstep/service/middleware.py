"""ASGI middleware of the gateway: the drain, header and body limits (size and time), the request counter.

Plain ASGI rather than `@app.middleware("http")`: that wrapper hides client disconnects from
handlers, and a synchronous request must see its client leave to cancel its work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from fewstep.service import errors
from fewstep.service.drain import Drain

WORK_ROUTES = {
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/jobs"),
}
"""Requests that start work: refused while draining (event streams and video sessions are refused too)."""


def _starts_work(scope: dict) -> bool:
    path: str = scope.get("path", "")
    if scope["type"] == "websocket":
        return True
    if scope.get("method") == "GET" and path.startswith("/v1/jobs/") and path.endswith("/events"):
        return True
    return (scope.get("method"), path) in WORK_ROUTES


class Draining:
    """ASGI middleware: counts requests and WebSockets in flight (`Drain.track`); while draining, refuses
    new work with 503 (a WebSocket is closed before it is accepted) and closes every connection after
    its response, so that clients reconnect to a gateway that is not leaving."""

    def __init__(self, app: Any, drain: Drain, retry_after_s: int = 2) -> None:
        self.app = app
        self.drain = drain
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.drain.draining.is_set() and _starts_work(scope):
            await self._refuse(scope, receive, send)
            return

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start" and self.drain.draining.is_set():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        with self.drain.track():
            await self.app(scope, receive, closing if scope["type"] == "http" else send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": "server shutting down"})
            return
        body = errors.error_body("server shutting down: retry on another instance", "NotReady", None, 503)
        headers = {"Retry-After": str(self.retry_after_s), "Connection": "close"}
        await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)


def host_name(host_header: str) -> str:
    """The name of a `Host` header without its port (`[::1]:8000` → `::1`), lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class TrustedHosts:
    """ASGI middleware: a `/v1/` request (HTTP or WebSocket) whose `Host` is not in `allowed` gets 400 (its
    WebSocket is closed before accept). A page on another site that rebinds its DNS name to this machine
    sends its own name as `Host` (and as `Origin`, so the same-origin check passes it): without keys, that
    page could use a server on the user's loopback. Health, metrics and the playground's page are not
    checked (probes and scrapers name the pod's address)."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
        if host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "Host not allowed"})
            return
        msg = f"`allowed_hosts` is {sorted(self.allowed)}. Given: Host {host[:100]!r}"
        body = errors.error_body(msg, "InvalidRequest", "Host", 400)
        await JSONResponse(body, status_code=400)(scope, receive, send)


class HeaderLimit:
    """ASGI middleware: 431 (OpenAI's error shape) for a request whose header block is over `limit` bytes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))  # ": " and CRLF per line
            if size > self.limit:
                msg = f"`max_header_bytes` is {self.limit}. Given: {size} bytes of headers"
                body = errors.error_body(msg, "HeadersTooLarge", "headers", 431)
                await JSONResponse(body, status_code=431)(scope, receive, send)
                return
        await self.app(scope, receive, send)


UPLOAD_PATHS = frozenset({"/v1/images/edits"})
"""Routes whose bodies carry images: bounded by `upload_max_bytes` rather than `max_body_bytes`."""


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes: at once by their declared length, else while
    reading them (bounded) before the app runs; 408 for a body not whole within `timeout_s`. The app
    gets the body replayed as one message; counting inside the app's own read instead would surface
    as the framework's 400."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0, uploads: int | None = None) -> None:
        """`uploads`: the larger limit of the upload routes (`UPLOAD_PATHS`; the `upload_max_bytes` setting)."""
        self.app = app
        self.limit = limit
        self.uploads = uploads
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, name = self.limit, "max_body_bytes"
        if self.uploads is not None and scope.get("path") in UPLOAD_PATHS:
            limit, name = self.uploads, "upload_max_bytes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, int(declared), limit, name)
            return
        seen = [0]
        try:
            async with asyncio.timeout(self.timeout_s):
                first = await self._read_bounded(receive, seen, limit)
        except TimeoutError:
            msg = f"`body_timeout_s` is {self.timeout_s:g}. Given: {seen[0]} bytes of the body in that time"
            body = errors.error_body(msg, "RequestTimeout", "body", 408)
            await JSONResponse(body, status_code=408, headers={"Connection": "close"})(scope, receive, send)
            return
        if first is None:
            await self._reject(scope, receive, send, seen[0], limit, name)
            return
        pending = [first]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()  # then disconnects, as they come

        await self.app(scope, replay, send)

    async def _read_bounded(self, receive: Callable[[], Awaitable[dict]], seen: list[int], limit: int) -> dict | None:
        """The whole body as one message, or None once it passes `limit`; a disconnect message is passed on
        as it is. `seen[0]` counts the bytes read so far (also when a deadline cuts the read short)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            seen[0] += len(chunks[-1])
            if seen[0] > limit:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _reject(self, scope: dict, receive: Any, send: Any, size: int, limit: int, name: str) -> None:
        msg = f"`{name}` is {limit}. Given: {size} bytes"
        resp = JSONResponse(errors.error_body(msg, "PayloadTooLarge", "body", 413), status_code=413)
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
