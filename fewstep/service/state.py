"""What every route of one gateway shares, kept on `app.state.gateway`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from fewstep.errors import Unauthorized
from fewstep.service.auth import AdminKeys, KeyRing
from fewstep.service.catalog import Catalog
from fewstep.service.clips import VideoClips
from fewstep.service.drain import Drain
from fewstep.service.events import EventHub
from fewstep.service.limits import Lease, Limits
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import JobQueue
from fewstep.service.settings import Settings
from fewstep.service.streams import VideoStreams

T = TypeVar("T")


@dataclass
class Gateway:
    """The parts of a running gateway. `images` are the models served through the queue (step engines: run here
    by embedded workers, or only routed to);
    `streams` the stream sessions and their models."""

    settings: Settings
    metrics: Metrics
    queue: JobQueue
    images: Catalog
    streams: VideoStreams
    keys: KeyRing
    admins: AdminKeys
    waits: ThreadPoolExecutor
    """Blocking queue calls (waits for results, SSE) get threads of their own, not the default pool's few."""
    limits: Limits
    """Per-key rate limits and concurrency caps (in Redis when the queue is)."""
    events: EventHub
    """Job events for every waiting request and stream, from one thread (service/events.py)."""
    drain: Drain = field(default_factory=Drain)
    """Work in flight, and whether the process is shutting down (service/drain.py)."""
    clips: VideoClips | None = None
    """This gateway's clip driver (service/clips.py): told when a video is queued here."""

    @property
    def keyed(self) -> bool:
        """Whether callers have keys (`FEWSTEP_API_KEYS`). Per-key limits are for keys: without auth every client
        is one "anonymous" owner, and a per-key default would cap the whole server below its capacity; the
        lanes' depths, the connection cap and the video rows still hold."""
        return self.keys.enabled

    async def spend(self, owner: str, what: str) -> None:
        """Charge one work-starting request (`what`) to the owner's token bucket; 429 when it is empty."""
        if not self.keyed:
            return
        s = self.settings
        names = "`key_requests_per_s`, `key_burst`"
        await self.call(self.limits.spend, owner, what, s.key_requests_per_s, s.key_burst, names)

    def owner_limit(self, limit: int) -> int | None:
        """A per-key cap as the queue takes it: None (no cap) without keys."""
        return limit if self.keyed else None

    async def hold(self, owner: str, what: str, limit: int, ttl_s: float, setting: str) -> Lease | None:
        """One of the owner's at most `limit` leases of `what` (429 naming `setting` when all are held); None
        without keys."""
        if not self.keyed:
            return None
        return await self.call(self.limits.hold, owner, what, limit, ttl_s, setting)

    async def renew(self, lease: Lease | None) -> None:
        if lease is not None:
            await self.call(self.limits.renew, lease)

    async def release(self, lease: Lease | None) -> None:
        if lease is not None:
            await self.call(self.limits.release, lease)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a wait thread."""
        return await asyncio.get_running_loop().run_in_executor(self.waits, functools.partial(fn, *args))

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        """A call of the queue's (`fn` is one of `queue`'s methods): inline when the queue is in this process,
        else in a wait thread."""
        if self.queue.in_process:
            return fn(*args)
        return await self.call(fn, *args)


async def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the gateway serving this request. (`async`: FastAPI runs a plain `def`
    dependency in a worker thread, a hop per request for an attribute read.)"""
    gw: Gateway = request.app.state.gateway
    return gw


async def principal(request: Request) -> str:
    """FastAPI dependency: the caller's key id (401 without a valid key when auth is on; 429 instead once the
    client address's failures pass their budget). Inline: only a failure makes a (Redis) call."""
    gw: Gateway = request.app.state.gateway
    try:
        return gw.keys.principal(request.headers.get("authorization"))
    except Unauthorized:
        await gw.call(charge_failure, gw, request.client.host if request.client else "")
        raise


def authenticate(gw: Gateway, authorization: str | None, address: str) -> str:
    """The owner of a request's key. Blocking (a Redis call with Redis, when the key fails)."""
    try:
        return gw.keys.principal(authorization)
    except Unauthorized:
        charge_failure(gw, address)
        raise


def charge_failure(gw: Gateway, address: str) -> None:
    """Charge one failed authentication to the client `address`; `Overloaded` (429) once its failures pass
    `auth_failures_per_s` and `auth_failure_burst`. Only failures are charged, after the key was checked: a
    valid key is never refused for its address (behind a proxy, every client shares the proxy's), and the
    address is the peer's unless a trusted proxy (`forwarded_allow_ips`) says otherwise."""
    s = gw.settings
    what = "failed authentications from this address"
    names = "`auth_failures_per_s`, `auth_failure_burst`"
    gw.limits.spend(f"address:{address}", what, s.auth_failures_per_s, s.auth_failure_burst, names)


GatewayDep = Annotated[Gateway, Depends(gateway)]
Owner = Annotated[str, Depends(principal)]
