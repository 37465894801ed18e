"""Signed webhooks of jobs: a real HTTP receiver verifies each delivery with the `standardwebhooks` package, sees
one delivery per job after a 500 then a 200, none for a host outside the allowlist or a private address the
settings do not allow; with Redis, a delivery due when a gateway stops is sent by the next one."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from pydantic import SecretStr

from fewstep.errors import InvalidRequest
from fewstep.service.queue.base import WebhookDue
from fewstep.service.settings import Settings
from fewstep.service.webhooks import backoff, check_url, host_allowed, payload, public, sign, signing_secret, whsec
from tests.conftest import RedisServer
from tests.service.gateway import in_process, settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Receiver:
    """A real HTTP server on loopback that answers each POST with the next status of `answers` (then 200)."""

    answers: list[int] = field(default_factory=list)
    seen: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0

    def url(self, path: str = "/hooks/fewstep?token=abc") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait(self, n: int, within: float = 30.0) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.seen) >= n, within), self.seen


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = r.answers.pop(0) if r.answers else 200
            self.send_response(status)
            self.end_headers()
            with r.arrived:
                r.seen.append((status, dict(self.headers.items()), body))
                r.arrived.notify_all()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    r.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield r
    server.shutdown()
    server.server_close()


def hooked(tmp: Path, **fields: Any) -> Settings:
    base = {"webhook_secret": "master-" + secrets.token_hex(8), "webhook_hosts": "127.0.0.1, *.example.com",
            "webhook_allow_private": True, "webhook_backoff_s": 0.05, "webhook_backoff_max_s": 0.2}  # fmt: skip
    return settings(tmp, **{**base, **fields})


def job(url: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "shapes", "requests": [{"prompt": "a red circle", "seed": 1, "steps": 2}]}
    return body if url is None else {**body, "webhook_url": url}


def test_urls_hosts_and_addresses_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    s = Settings(webhook_secret=SecretStr("m"), webhook_hosts=["hooks.example.com", "*.corp.example"])
    assert check_url("https://hooks.example.com/x?t=1", s) == "https://hooks.example.com/x?t=1"
    assert check_url("http://a.corp.example:8080/", s)
    cases = [
        ("https://evil.example.org/", "a URL on a host `webhook_hosts` names (hooks.example.com, *.corp.example)"),
        ("https://corp.example/", "Given: 'corp.example'"),  # the wildcard is for subdomains
        ("ftp://hooks.example.com/", "an http or https URL with a host"),
        ("https://user:pw@hooks.example.com/", "must not carry credentials"),
        ("https://hooks.example.com:99999/", "an http or https URL"),
        ("https://hooks.example.com/" + "a" * 3000, "at most 2048 characters"),
    ]
    for url, needle in cases:
        with pytest.raises(InvalidRequest, match=needle.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            check_url(url, s)
    with pytest.raises(InvalidRequest, match="`webhook_secret` is not set"):
        check_url("https://hooks.example.com/", Settings())
    assert host_allowed("A.Corp.Example.", ["*.corp.example"]) and not host_allowed("xcorp.example", ["*.corp.example"])
    for address, ok in [("8.8.8.8", True), ("2001:4860::8888", True), ("10.1.2.3", False), ("127.0.0.1", False),
                        ("169.254.169.254", False), ("::ffff:192.168.0.1", False), ("::1", False), ("224.0.0.1", False),
                        ("100.64.0.1", False), ("0.0.0.0", False)]:  # fmt: skip
        assert public(address) is ok, address


def test_signatures_verify_with_the_standard_webhooks_package_and_each_key_has_its_own_secret() -> None:
    s = Settings(webhook_secret=SecretStr("master"))
    alice, bob = signing_secret(s, "alice"), signing_secret(s, "bob")
    assert alice != bob and len(alice) == 32
    due = WebhookDue("msg_j1", "j1", "alice", "https://x/", "shapes", (2, 2, 0, 0), False, 10.0, 12.5)
    body = json.dumps(payload(due)).encode()
    now = int(time.time())
    headers = {"webhook-id": due.id, "webhook-timestamp": str(now), "webhook-signature": sign(alice, due.id, now, body)}
    event = standardwebhooks.Webhook(whsec(alice)).verify(body, headers)
    assert event["type"] == "job.completed" and event["data"]["id"] == "j1" and event["data"]["done"] == 2
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(whsec(bob)).verify(body, headers)  # another key's secret does not verify
    rng = random.Random(1)
    waits = [backoff(n, Settings(webhook_backoff_s=1, webhook_backoff_max_s=5), rng) for n in range(6)]
    assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2 and all(2.5 <= w <= 5 for w in waits[3:])


def verified(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    hook = standardwebhooks.Webhook(secret)
    return [hook.verify(body, headers) for _, headers, body in receiver.seen]


@pytest.mark.slow  # a gateway and a receiver server
async def test_a_job_is_announced_once_after_a_500_then_a_200_and_never_outside_the_allowlist(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answers = [500]
    async with in_process(hooked(tmp_path)) as c:
        secret = (await c.get("/v1/webhooks/secret")).json()["secret"]
        assert secret.startswith("whsec_")
        refused = await c.post("/v1/jobs", json=job("https://elsewhere.example.org/hook"))
        assert refused.status_code == 400 and "`webhook_hosts`" in refused.json()["error"]["message"]
        assert "elsewhere.example.org" in refused.text and "/hook" not in refused.text  # the host, never the path
        made = await c.post("/v1/jobs", json=job(receiver.url()))
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]
        await asyncio.to_thread(receiver.wait, 2)
        await asyncio.sleep(0.5)  # a third attempt, were there one, would come within the backoff
        assert [status for status, _, _ in receiver.seen] == [500, 200]
        events = verified(receiver, secret)
        assert [e["type"] for e in events] == ["job.completed"] * 2 and events[0]["data"]["id"] == job_id
        ids = {headers["webhook-id"] for _, headers, _ in receiver.seen}
        assert ids == {f"msg_{job_id}"}  # one message, sent twice: the receiver can drop the repeat
        metrics = (await c.get("/metrics")).text
        assert 'fewstep_webhook_attempts_total{outcome="failed"} 1.0' in metrics
        assert 'fewstep_webhook_attempts_total{outcome="delivered"} 1.0' in metrics


@pytest.mark.slow  # a gateway and a receiver server
async def test_a_private_address_is_refused_unless_allowed(tmp_path: Path, receiver: Receiver) -> None:
    async with in_process(hooked(tmp_path, webhook_allow_private=False)) as c:
        made = await c.post("/v1/jobs", json=job(receiver.url()))
        assert made.status_code == 202
        deadline = time.monotonic() + 30
        while 'fewstep_webhook_attempts_total{outcome="refused"} 1.0' not in (await c.get("/metrics")).text:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert receiver.seen == []


@pytest.mark.slow  # a redis-server
async def test_with_redis_a_delivery_due_when_a_gateway_stops_is_sent_by_the_next(
    tmp_path: Path, receiver: Receiver, redis_server: RedisServer
) -> None:
    receiver.answers = [503] * 1000  # down until told otherwise
    redis = {"redis_url": redis_server.url, "redis_prefix": f"wh{secrets.token_hex(3)}", "embedded_workers": 1}
    config = hooked(tmp_path, **redis, webhook_backoff_s=0.2, webhook_backoff_max_s=0.5)
    async with in_process(config) as c:
        secret = (await c.get("/v1/webhooks/secret")).json()["secret"]
        job_id = (await c.post("/v1/jobs", json=job(receiver.url()))).json()["id"]
        await asyncio.to_thread(receiver.wait, 1)
    down = len(receiver.seen)
    receiver.answers.clear()  # the receiver is back; the first gateway is gone
    async with in_process(config) as c:
        await asyncio.to_thread(receiver.wait, down + 1)
        await asyncio.sleep(1.0)
        statuses = [status for status, _, _ in receiver.seen]
        assert statuses == [503] * down + [200]  # delivered once, by the second gateway
        assert verified(receiver, secret)[-1]["data"]["id"] == job_id
        assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"
