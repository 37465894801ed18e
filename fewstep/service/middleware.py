"""ASGI middleware of the gateway: the request body limit and the request counter.

Plain ASGI rather than `@app.middleware("http")`: that wrapper hides client disconnects from
handlers, and a synchronous request must see its client leave to cancel its work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from fewstep.service import errors


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes: at once by their declared length, else while
    reading them (bounded) before the app runs. The app gets the body replayed as one message; counting
    inside the app's own read instead would surface as the framework's 400."""

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
        first, size = await self._read_bounded(receive)
        if first is None:
            await self._reject(scope, receive, send, size)
            return
        pending = [first]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()  # then disconnects, as they come

        await self.app(scope, replay, send)

    async def _read_bounded(self, receive: Callable[[], Awaitable[dict]]) -> tuple[dict | None, int]:
        """The whole body as one message, or (None, bytes seen) once it passes `limit`; a disconnect
        message is passed on as it is."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message, size
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None, size
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}, size

    async def _reject(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        msg = f"`max_body_bytes` is {self.limit}. Given: {size} bytes"
        resp = JSONResponse(errors.error_body(msg, "InvalidRequest", "body"), status_code=413)
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
