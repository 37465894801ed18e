"""Server helpers shared by the benchmarks that run `fewstep serve` as a process."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 180.0) -> None:
    """Return once `url` answers /readyz with 200; RuntimeError with the server's log if it exits or takes
    longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server not ready:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


def start_serve(tmp: Path, root: Path, env_extra: dict[str, str]) -> tuple[str, subprocess.Popen[bytes], Path]:
    """`fewstep serve` on a free port with its own registry under `tmp`, the shipped checkpoints of `root`,
    video off and warnings-only logs (plus `env_extra`); its URL, process and log, once it is ready."""
    import os
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_REGISTRY": str(tmp / "registry"),
        "FEWSTEP_CHECKPOINTS": str(root / "checkpoints"),
        "FEWSTEP_VIDEO_MAX_SESSIONS": "0",
        "FEWSTEP_LOG_LEVEL": "warning",
        **env_extra,
    }
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fewstep.cli", "serve"], env=env, stdout=out, stderr=out)
    wait_ready(url, proc, log)
    return url, proc, log


@contextmanager
def clean_serve(tmp: Path, env_extra: dict[str, str], log_name: str = "server.log") -> Iterator[str]:
    """`fewstep serve` on a free port over the registry in `tmp` (no shipped checkpoints), with `make serve`'s
    defaults: no FEWSTEP_ setting of this environment leaks in, only `env_extra`. Its base URL while it runs;
    SIGTERM (the drain) afterwards."""
    import os
    import signal
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEWSTEP_")}
    env |= {
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_REGISTRY": str(tmp / "registry"),
        "FEWSTEP_CHECKPOINTS": str(tmp / "no-checkpoints"),
        "FEWSTEP_LOG_LEVEL": "warning",
        **env_extra,
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp / log_name
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fewstep.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp
        )
    try:
        wait_ready(url, proc, log, timeout_s=300)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
