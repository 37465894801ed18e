"""What every route of one gateway shares, kept on `app.state.gateway`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from fewstep.engines.base import StepEngine
from fewstep.service.auth import AdminKeys, KeyRing
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

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a wait thread."""
        return await asyncio.get_running_loop().run_in_executor(self.waits, functools.partial(fn, *args))


def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the gateway serving this request."""
    gw: Gateway = request.app.state.gateway
    return gw


def principal(request: Request) -> str:
    """FastAPI dependency: the caller's key id (401 without a valid key when auth is on)."""
    return gateway(request).keys.principal(request.headers.get("authorization"))


GatewayDep = Annotated[Gateway, Depends(gateway)]
Owner = Annotated[str, Depends(principal)]
