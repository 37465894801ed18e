"""What every route of one gateway shares, kept on `app.state.gateway`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from fewstep.engines.base import StepEngine
from fewstep.errors import Unauthorized
from fewstep.service.auth import AdminKeys, KeyRing
from fewstep.service.drain import Drain
from fewstep.service.events import EventHub
from fewstep.service.limits import Limits
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import JobQueue
from fewstep.service.settings import Settings
from fewstep.service.streams import VideoStreams
from fewstep.service.versions import Versions

T = TypeVar("T")


@dataclass
class Gateway:
    """The parts of a running gateway. `images` are the models served through the queue (step engines);
    `streams` the stream sessions and their models."""

    settings: Settings
    metrics: Metrics
    queue: JobQueue
    images: Versions[StepEngine]
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

    async def spend(self, owner: str, what: str) -> None:
        """Charge one work-starting request (`what`) to the owner's token bucket; 429 when it is empty."""
        s = self.settings
        names = "`key_requests_per_s`, `key_burst`"
        await self.call(self.limits.spend, owner, what, s.key_requests_per_s, s.key_burst, names)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a wait thread."""
        return await asyncio.get_running_loop().run_in_executor(self.waits, functools.partial(fn, *args))


async def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the gateway serving this request. (`async`: FastAPI runs a plain `def`
    dependency in a worker thread, a hop per request for an attribute read.)"""
    gw: Gateway = request.app.state.gateway
    return gw


async def principal(request: Request) -> str:
    """FastAPI dependency: the caller's key id (401 without a valid key when auth is on; 429 for a client
    address past its failed-authentication budget, before its key is checked). Inline unless the
    failure budget lives in Redis."""
    gw: Gateway = request.app.state.gateway
    args = (gw, request.headers.get("authorization"), request.client.host if request.client else "")
    if not gw.keys.enabled or gw.settings.redis_url is None:
        return authenticate(*args)
    return await gw.call(authenticate, *args)


def authenticate(gw: Gateway, authorization: str | None, address: str) -> str:
    """The owner of a request's key; failed attempts are charged to the client `address`, which is refused
    (429) once they pass `auth_failures_per_s` and `auth_failure_burst`. Blocking (a Redis call with Redis)."""
    if not gw.keys.enabled:
        return gw.keys.principal(authorization)
    s, bucket = gw.settings, f"address:{address}"
    budget = (bucket, "failed authentications from this address", s.auth_failures_per_s, s.auth_failure_burst)
    names = "`auth_failures_per_s`, `auth_failure_burst`"
    gw.limits.spend(*budget, names, cost=0.0)
    try:
        return gw.keys.principal(authorization)
    except Unauthorized:
        gw.limits.spend(*budget, names)
        raise


GatewayDep = Annotated[Gateway, Depends(gateway)]
Owner = Annotated[str, Depends(principal)]
