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

A header block that outgrows h11's buffer while it is still arriving (`max_head_bytes`) gets 431 in
OpenAI's error shape, like one that arrives whole and is refused by `middleware.HeaderLimit`, instead
of uvicorn's plain-text 400. After any refusal of a malformed head the connection closes lingering:
the response is sent, the write side shut, and what the client is still sending is read and dropped
(for at most `LINGER_S` and `LINGER_BYTES`). Closing at once with unread bytes in the socket makes the
kernel answer with a reset, which can reach the client before it has read the response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from fewstep.service import errors

LINGER_S = 5.0
LINGER_BYTES = 1 << 20

log = logging.getLogger("fewstep.service")


def _over_capacity(max_connections: int) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        msg = f"`max_connections` is {max_connections}: this gateway has no room for another connection"
        body = errors.error_body(msg, "Overloaded", None, 503)
        await JSONResponse(body, 503, headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)

    return app


def head_buffer(max_header_bytes: int) -> int:
    """h11's buffer for a head still arriving (`uvicorn.Config(h11_max_incomplete_event_size=...)`): room
    for a whole block over `max_header_bytes`, which `middleware.HeaderLimit` then refuses."""
    return 2 * max_header_bytes


def guarded_protocol(head_timeout_s: float, max_connections: int, max_header_bytes: int) -> type[H11Protocol]:
    """An `H11Protocol` class for `uvicorn.Config(http=...)` with these limits."""
    over_capacity = _over_capacity(max_connections)
    max_head_bytes = head_buffer(max_header_bytes)
    refusal = errors.error_body(
        f"`max_header_bytes` is {max_header_bytes}. Given: over {max_head_bytes} bytes of headers, still arriving",
        "HeadersTooLarge",
        "headers",
        431,
    )

    class Guarded(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0  # of the request head now arriving
        _lingering: int | None = None  # bytes dropped since the refusal; None while serving

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app = over_capacity  # this connection only
            self._arm_head()

        def data_received(self, data: bytes) -> None:
            if self._lingering is not None:
                self._lingering += len(data)
                if self._lingering > LINGER_BYTES:
                    self.transport.close()
                return
            if self.conn.their_state is h11.IDLE:
                if self._head_timer is None:
                    self._arm_head()  # the first byte of a new request head
                self._head_bytes += len(data)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_head()  # the head is complete (or the connection is done)
                self._head_bytes = 0

        def send_400_response(self, msg: str) -> None:
            """h11 refused the head: 431 in OpenAI's shape when it outgrew the buffer, else uvicorn's plain
            400; then a lingering close (uvicorn's own closes at once)."""
            self._disarm_head()
            if self._head_bytes > max_head_bytes:
                status, kind, body = 431, b"application/json", json.dumps(refusal).encode()
            else:
                status, kind, body = 400, b"text/plain; charset=utf-8", msg.encode("ascii")
            headers = [(b"content-type", kind), (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._linger()

        def _linger(self) -> None:
            self._lingering = 0
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

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
