"""The gateway's HTTP/1.1 connections: uvicorn's h11 protocol with a deadline on request heads and a
connection cap answered in OpenAI's error shape.

uvicorn has no deadline for a request's line and headers: a connection that sends nothing, or one
byte every few seconds (slowloris), was held open forever, and each one counts against the
connection cap, so a few hundred such sockets refused everyone else. Here a connection must deliver
a whole request head within `head_timeout_s` of connecting, or of its first byte after a keep-alive
response (idle keep-alive connections are uvicorn's `timeout_keep_alive`). Bodies have their own
deadline (`middleware.BodyLimit`).

Past `max_connections` open connections, a new connection's requests get 503 with `Retry-After`
and `Connection: close` from a small ASGI app of its own, instead of uvicorn's plain-text 503.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from fewstep.service import errors

log = logging.getLogger("fewstep.service")


def _over_capacity(max_connections: int) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        msg = f"`max_connections` is {max_connections}: this gateway has no room for another connection"
        body = errors.error_body(msg, "Overloaded", None, 503)
        await JSONResponse(body, 503, headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)

    return app


def guarded_protocol(head_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An `H11Protocol` class for `uvicorn.Config(http=...)` with these limits."""
    over_capacity = _over_capacity(max_connections)

    class Guarded(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app = over_capacity  # this connection only
            self._arm_head()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_head()  # the first byte of a new request head
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_head()  # the head is complete (or the connection is done)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head()
            super().connection_lost(exc)

        def _arm_head(self) -> None:
            self._disarm_head()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_expired)

        def _disarm_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("closing %s: no whole request head within %.0f s (`head_timeout_s`)", peer, head_timeout_s)
                self.transport.close()

    return Guarded
