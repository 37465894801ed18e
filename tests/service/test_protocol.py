"""Slow and greedy clients against a real `fewstep serve` (raw sockets): silent and slowloris connections
are closed at the request-head deadline, a slow body gets 408, and connections past the cap get 503 in
OpenAI's error shape, while well-behaved clients are served throughout."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # a `fewstep serve` process

HEAD_TIMEOUT_S = 2
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("protocol")
    (tmp / "no-models").mkdir()
    env = {
        "FEWSTEP_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "FEWSTEP_BODY_TIMEOUT_S": "2",
        "FEWSTEP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "FEWSTEP_KEEP_ALIVE_S": "120",  # idle keep-alive connections stay: they fill the cap below
    }
    s = start_server(tmp, env, wait_ready=False, checkpoints=tmp / "no-models")  # no models: starts fast
    yield s
    stop_server(s)


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """True once the server closes `sock` (within `seconds`), sending `trickle` a byte at a time meanwhile."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.5)
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionResetError:
            return True
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            sent += 1
    return False


def _response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


def test_a_silent_connection_and_a_slowloris_are_closed_at_the_head_deadline(server: Server) -> None:
    silent = _connect(server)
    slow = _connect(server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    # A header line a byte every half second: it never completes within the deadline, yet keeps sending.
    try:
        assert _closed_within(silent, 30)
        assert _closed_within(slow, 30, trickle=b"X-Slow: " + b"a" * 200)
    finally:
        silent.close()
        slow.close()
    assert httpx.get(server.url + "/healthz").status_code == 200  # everyone else is served meanwhile
    assert "no whole request head within" in server.output()


def test_a_body_that_does_not_arrive_in_time_gets_408_naming_the_setting(server: Server) -> None:
    sock = _connect(server)
    head = b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    sock.sendall(head + b'{"model": ')
    status, headers, body = _response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "RequestTimeout" and body["error"]["type"] == "invalid_request_error"
    assert "`body_timeout_s` is 2. Given: 10 bytes" in body["error"]["message"]
    sock.close()


def test_a_header_block_outgrowing_the_buffer_while_arriving_gets_431_and_a_lingering_close(server: Server) -> None:
    # Sent in pieces, the block is never whole in h11's buffer: it is refused at 2 × `max_header_bytes`
    # (32 KiB) while the client is still sending. Closing at once then reset the connection under the
    # client before it read the answer (a flaky ReadError in CI).
    sock = _connect(server)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
    for _ in range(9):
        sock.sendall(b"a" * 8192)  # the server reads and drops what follows its answer
        time.sleep(0.05)
    sock.sendall(b"\r\n\r\n")
    status, headers, body = _response(sock)
    assert status == 431 and headers["connection"] == "close"
    assert body["error"]["code"] == "HeadersTooLarge" and body["error"]["type"] == "invalid_request_error"
    assert "`max_header_bytes` is 16384" in body["error"]["message"]
    sock.settimeout(30)
    assert sock.recv(4096) == b""  # an orderly end of stream, not a reset
    sock.close()
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_connections_past_the_cap_get_503_in_openai_shape_and_room_comes_back(server: Server) -> None:
    idle = []
    for _ in range(MAX_CONNECTIONS):
        sock = _connect(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _response(sock)[0] == 200  # then idle, kept alive
        idle.append(sock)
    extra = _connect(server)
    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, headers, body = _response(extra)
    assert status == 503 and int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert body["error"]["code"] == "Overloaded"
    assert f"`max_connections` is {MAX_CONNECTIONS}" in body["error"]["message"]
    extra.close()
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/healthz").status_code != 200:  # the server notices the closes
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_settings_out_of_range_are_refused_naming_the_setting(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from fewstep.service.settings import Settings

    for name, value in (("head_timeout_s", 0.1), ("body_timeout_s", 0), ("max_connections", 0)):
        with pytest.raises(ValidationError, match=name):
            Settings(**{name: value})  # type: ignore[arg-type]
