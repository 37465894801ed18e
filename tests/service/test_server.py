"""`fewstep serve` under uvicorn: whose address a request has (`forwarded_allow_ips`), as the failed-auth budget
counts it. A real process and real HTTP: the proxy headers are uvicorn's, not the app's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
KEY = "key-one-0123456789"
ENV = {
    "FEWSTEP_ENGINE": "noop",
    "FEWSTEP_VIDEO_MAX_SESSIONS": "0",
    "FEWSTEP_API_KEYS": KEY,
    "FEWSTEP_AUTH_FAILURES_PER_S": "0.01",
    "FEWSTEP_AUTH_FAILURE_BURST": "3",
}


def _guess(url: str, forwarded_for: str | None) -> int:
    headers = {"Authorization": "Bearer not-the-key-0000"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return httpx.get(url + "/v1/models", headers=headers, timeout=30).status_code


def test_forwarded_addresses_count_only_from_the_proxies_named(tmp_path: Path) -> None:
    for name in ("direct", "proxied"):
        (tmp_path / name).mkdir()
    direct = start_server(tmp_path / "direct", ENV)  # no proxy named: what a client sends is not believed
    try:
        codes = [_guess(direct.url, f"203.0.113.{i}") for i in range(6)]  # rotating the header escapes nothing
        assert codes == [401] * 3 + [429] * 3, codes
        valid = httpx.get(direct.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert valid.status_code == 200  # and the address's failures never refuse a valid key
    finally:
        stop_server(direct)
    proxied = start_server(tmp_path / "proxied", {**ENV, "FEWSTEP_FORWARDED_ALLOW_IPS": "127.0.0.0/8"})
    try:
        assert [_guess(proxied.url, f"203.0.113.{i}") for i in range(6)] == [401] * 6  # each client its own budget
        assert [_guess(proxied.url, "198.51.100.7") for _ in range(4)] == [401] * 3 + [429]
    finally:
        stop_server(proxied)
