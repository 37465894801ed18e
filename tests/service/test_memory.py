"""Memory under repeated load (in the style of Triton's memory-growth tests), with a negative control.

A real `fewstep serve` (embedded queue, no-op engine) takes the same load round after round:
synchronous requests, jobs read to their end over SSE and for their results, jobs submitted
and cancelled. Its resident memory after the first round (warm: caches, pools and arenas
filled) and after the last may differ by at most `BOUND_MB`. The same load against a build that
keeps 256 KiB per request must fail that bound, or the test could not tell a leak.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # server processes under load

ROUNDS = 3
BOUND_MB = 12.0
LEAKY = str(Path(__file__).with_name("leaky_server.py"))
ENV = {"FEWSTEP_ENGINE": "noop", "FEWSTEP_VIDEO_MAX_SESSIONS": "0", "FEWSTEP_KEY_REQUESTS_PER_S": "100000"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def one_round(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(100):
            body = {"model": "shapes", "prompt": f"a red circle {i % 7}", "steps": 1 + i % 4, "n": 1 + i % 2}
            assert http.post("/v1/images/generations", json=body).status_code == 200
        for _ in range(10):
            job = http.post("/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "a blue square"}] * 4})
            job_id = job.json()["id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
                lines = list(events.iter_lines())
            assert events.status_code == 200 and "event: end" in lines, (events.status_code, lines)
            assert len(http.get(f"/v1/jobs/{job_id}/results").json()["data"]) == 4
            cancelled = http.post("/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "x"}] * 8})
            http.delete(f"/v1/jobs/{cancelled.json()['id']}")


def growth_mb(server: Server) -> tuple[float, list[float]]:
    """RSS after each round; the growth from the first round's end to the last's."""
    samples = []
    for _ in range(ROUNDS):
        one_round(server.url)
        time.sleep(0.5)  # let the last cancelled items leave the running batch
        samples.append(rss_mb(server.proc.pid))
    return samples[-1] - samples[0], samples


def test_memory_stays_flat_under_repeated_load(tmp_path: Path) -> None:
    server = start_server(tmp_path, ENV)
    try:
        grew, samples = growth_mb(server)
    finally:
        stop_server(server)
    assert grew < BOUND_MB, f"RSS grew {grew:.1f} MB over {ROUNDS - 1} rounds: {samples}"


def test_the_negative_control_a_leaking_build_fails_the_same_bound(tmp_path: Path) -> None:
    server = start_server(tmp_path, ENV, command=[sys.executable, "-P", LEAKY])
    try:
        grew, samples = growth_mb(server)
    finally:
        stop_server(server)
    assert grew >= BOUND_MB, f"the leak went unseen: RSS grew {grew:.1f} MB: {samples}"
