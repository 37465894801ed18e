"""Test-only `fewstep serve` that leaks: it keeps 256 KiB for every request it answers, forever.

The negative control of the memory-growth test (test_memory.py): the test must tell this build
from the real one. Usage: leaky_server.py (settings from FEWSTEP_* variables, as `fewstep serve`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fewstep.service import server
from fewstep.service.app import create_app
from fewstep.service.settings import Settings

KEPT: list[bytes] = []


def leaking_app(settings: Settings) -> Any:
    app = create_app(settings)
    inner = app.build_middleware_stack

    def build() -> Any:
        stack = inner()

        async def leak(scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
            if scope["type"] == "http":
                KEPT.append(b"\x01" * (256 * 1024))  # written, so its pages are resident
            await stack(scope, receive, send)

        return leak

    app.build_middleware_stack = build  # type: ignore[method-assign]
    return app


if __name__ == "__main__":
    server.create_app = leaking_app  # type: ignore[assignment]
    raise SystemExit(server.serve(Settings()))
