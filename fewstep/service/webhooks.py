"""Signed webhooks: a job's end announced to a URL its owner named, per the Standard Webhooks scheme.

* **Accepted**: a job's `webhook_url` must be http(s), without credentials, within `webhook_max_url_chars`, to a
  host `webhook_hosts` names (exactly, or `*.domain` for its subdomains); checked before the job is queued.
* **Scheduled where it cannot be lost**: the queue records the delivery in the same step that writes the job's
  last result (`JobQueue.finish`; with Redis, in Redis, so a gateway restart loses nothing). Any gateway's
  `WebhookSender` takes due deliveries under a lease, so two gateways do not send one at once, and one that
  dies leaves its deliveries to the others when the lease ends.
* **Sent to the address checked**: the host is resolved once per attempt; unless `webhook_allow_private`, every
  address must be public (not private, loopback, link-local, multicast, reserved, or the cloud metadata
  address), and the request connects to the checked address, with the host name in `Host` and in TLS's SNI
  and certificate check, so a DNS answer that changes in between (rebinding) cannot redirect it. Redirects
  are not followed; the answer's body is not read.
* **Signed per key**: `webhook-id` (one per job: receivers drop repeats), `webhook-timestamp` (Unix seconds)
  and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the key's secret). The
  secret is derived from `webhook_secret` and the key's id, and shown to that key alone
  (`GET /v1/webhooks/secret`, as `whsec_` + base64, the form Standard Webhooks libraries take).
* **Retried**: any answer but 2xx, or none within `webhook_timeout_s`, is retried after `webhook_backoff_s`
  doubling up to `webhook_backoff_max_s`, each wait drawn between half and the whole of it (so receivers that
  come back are not hit by every sender at once), until `webhook_retry_for_s` after the job finished. Every
  attempt is counted in `fewstep_webhook_attempts{outcome}`. URLs are never logged (they may hold a token):
  only their host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import httpx

from fewstep.errors import FewstepError, InvalidRequest, limit_error
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import JobQueue, WebhookDue
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.webhooks")
EVENTS = {"succeeded": "job.completed", "failed": "job.failed", "cancelled": "job.cancelled"}
"""The event type of each way a job ends."""
Outcome = Literal["delivered", "failed", "refused"]


def check_url(url: str, settings: Settings) -> str:
    """`url` if a job may announce its end to it; InvalidRequest naming the rule otherwise."""
    if settings.webhook_secret is None:
        raise InvalidRequest("webhook_url", "webhooks are not enabled here (`webhook_secret` is not set)")
    if len(url) > settings.webhook_max_url_chars:
        raise limit_error(
            "webhook_url", f"at most {settings.webhook_max_url_chars} characters", f"{len(url)} characters"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise limit_error("webhook_url", "an http or https URL", host_of(url)) from e
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise limit_error("webhook_url", "an http or https URL with a host", host_of(url))
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("webhook_url", "`webhook_url` must not carry credentials (user:password@)")
    if not host_allowed(parts.hostname, settings.webhook_hosts):
        allowed = ", ".join(settings.webhook_hosts) or "none"
        raise limit_error("webhook_url", f"a URL on a host `webhook_hosts` names ({allowed})", parts.hostname)
    return url


def host_of(url: str) -> str:
    """What may be said of a URL in a message or a log: its host (a path or query may hold a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for rule in (a.lower().rstrip(".") for a in allowed):
        if rule.startswith("*.") and host.endswith(rule[1:]) and host != rule[2:]:
            return True
        if host == rule:
            return True
    return False


def public(address: str) -> bool:
    """Whether an address is one a webhook may reach without `webhook_allow_private`."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address a delivery connects to; OSError when the host does not resolve (for now: retried), `Refused`
    when (unless `allow_private`) any of its addresses is not public (a name with one private answer is refused
    whole: the next lookup could return that one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # OSError: retried as a failed attempt
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError(f"{host} does not resolve")
    if not allow_private and not all(public(a) for a in addresses):
        raise Refused(f"{host} resolves to a non-public address (`webhook_allow_private` is off)")
    return addresses[0]


class Refused(Exception):
    """A delivery the settings forbid: counted `refused` and given up."""


def signing_secret(settings: Settings, owner: str) -> bytes:
    """The signing secret of one key (its id `owner`), derived from `webhook_secret`."""
    assert settings.webhook_secret is not None
    master = settings.webhook_secret.get_secret_value().encode()
    return hmac.new(master, b"fewstep webhook secret\x00" + owner.encode(), hashlib.sha256).digest()


def whsec(secret: bytes) -> str:
    """A secret in the form Standard Webhooks libraries take."""
    return "whsec_" + base64.b64encode(secret).decode()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of one message (scheme version 1)."""
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def payload(due: WebhookDue) -> dict[str, Any]:
    """The event a delivery sends: its type, when, and the job as it ended."""
    total, done, failed, cancelled = due.counts
    return {
        "type": EVENTS.get(due.state, "job.failed"),
        "timestamp": datetime.fromtimestamp(due.finished, UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "id": due.job,
            "object": "job",
            "status": due.state,
            "model": due.model,
            "total": total,
            "done": done,
            "failed": failed,
            "cancelled": cancelled,
            "created": due.created,
            "finished": due.finished,
        },
    }


def deliver(due: WebhookDue, settings: Settings, client: httpx.Client) -> Outcome:
    """One attempt: POST the signed event to the checked address. `delivered` on 2xx, `failed` otherwise."""
    parts = urlsplit(due.url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = resolve(parts.hostname, port, settings.webhook_allow_private)
    except Refused as e:
        log.warning("webhook %s of job %s not sent: %s", due.id, due.job, e)
        return "refused"
    except OSError as e:
        log.info("webhook %s of job %s: %s does not resolve (%s)", due.id, due.job, parts.hostname, e)
        return "failed"
    body = json.dumps(payload(due), separators=(",", ":")).encode()
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "fewstep-webhooks",
        "host": parts.netloc.rpartition("@")[2],
        "webhook-id": due.id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(signing_secret(settings, due.owner), due.id, now, body),
    }
    target = SplitResult(parts.scheme, f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                         parts.path or "/", parts.query, "").geturl()  # fmt: skip
    try:
        with client.stream(
            "POST", target, content=body, headers=headers, extensions={"sni_hostname": parts.hostname}
        ) as answer:
            ok = 200 <= answer.status_code < 300
    except httpx.HTTPError as e:
        log.info("webhook %s of job %s to %s: %s", due.id, due.job, parts.hostname, type(e).__name__)
        return "failed"
    if not ok:
        log.info("webhook %s of job %s to %s: HTTP %d", due.id, due.job, parts.hostname, answer.status_code)
    return "delivered" if ok else "failed"


def backoff(attempts: int, settings: Settings, rng: random.Random) -> float:
    """Wait before attempt `attempts` + 1: doubling from `webhook_backoff_s`, capped, with jitter in [½, 1]."""
    ceiling = min(settings.webhook_backoff_s * 2.0 ** min(attempts, 40), settings.webhook_backoff_max_s)
    return ceiling * (0.5 + 0.5 * rng.random())


class WebhookSender:
    """Sends due webhooks from a queue until stopped: `lanes` deliveries at once, each under a lease."""

    POLL_S = 0.25
    LANES = 4

    def __init__(self, queue: JobQueue, settings: Settings, metrics: Metrics) -> None:
        self.queue, self.settings, self.metrics = queue, settings, metrics
        self.rng = random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_s + 5)

    def run(self) -> None:
        s = self.settings
        timeout = httpx.Timeout(s.webhook_timeout_s)
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            ThreadPoolExecutor(self.LANES, thread_name_prefix="webhook") as pool,
        ):
            while not self._stop.is_set():
                try:
                    due = self.queue.webhooks_due(time.time(), s.webhook_timeout_s + 30, self.LANES * 4)
                except FewstepError as e:  # the queue is away: try again shortly, nothing is lost
                    log.warning("webhooks: queue unreachable: %s", e)
                    due = []
                for d, outcome in zip(due, pool.map(lambda d: deliver(d, s, client), due), strict=True):
                    self._settle(d, outcome)
                if not due:
                    self._stop.wait(self.POLL_S)

    def _settle(self, due: WebhookDue, outcome: Outcome) -> None:
        now = time.time()
        try:
            if outcome == "delivered" or outcome == "refused":
                self.queue.webhook_done(due)
            else:
                at = now + backoff(due.attempts, self.settings, self.rng)
                if at > due.finished + self.settings.webhook_retry_for_s:
                    outcome = "expired" if outcome == "failed" else outcome  # type: ignore[assignment]
                    log.warning("webhook %s of job %s given up after %d attempts", due.id, due.job, due.attempts + 1)
                    self.queue.webhook_done(due)
                else:
                    self.queue.webhook_retry(due, at)
        except FewstepError as e:  # its lease ends and it is sent again: at least once, never lost
            log.warning("webhook %s: queue unreachable: %s", due.id, e)
        self.metrics.webhook_attempts.labels(outcome).inc()
