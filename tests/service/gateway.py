"""Test support: a gateway in this process (`create_app` behind `httpx.ASGITransport`), and tiny registry
versions that need no network to serve (the no-op engine reads only their manifests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.schedules import default_student_schedule
from fewstep.service.app import create_app
from fewstep.service.settings import Settings


def tiny_checkpoint(folder: Path, name: str, kind: str = "image", **extra: Any) -> Path:
    """A checkpoint folder with a 1-step-to-4-step schedule, a 32×32 native size and a weights file of a few
    bytes: enough for a registry version whose engine needs no network."""
    manifest = {
        "name": name,
        "version": "1",
        "kind": kind,
        "native_size": "32x32",
        "schedule": default_student_schedule().to_dict(),
        **extra,
    }
    save_checkpoint(folder, {"w": torch.zeros(4)}, manifest)
    return folder


def settings(tmp: Path, checkpoints: Path | None = None, **fields: Any) -> Settings:
    """Settings of an in-process gateway on the no-op engine with its own registry; no video."""
    seed = checkpoints if checkpoints is not None else tmp / "no-checkpoints"
    if checkpoints is None:
        tiny_checkpoint(seed / "shapes", "shapes")
    base: dict[str, Any] = {
        "registry": tmp / "registry",
        "checkpoints": seed,
        "engine": "noop",
        "video_max_sessions": 0,
        "threads": 1,
        "watch_interval_s": 0.1,
    }
    return Settings(**{**base, **fields})


@asynccontextmanager
async def in_process(config: Settings, ready_within: float = 60.0) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on a gateway running in this process (lifespan included), once it is ready."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            deadline = time.monotonic() + ready_within
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, (await client.get("/readyz")).text
                await asyncio.sleep(0.05)
            yield client
