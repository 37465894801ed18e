"""SIGTERM under load: what was accepted finishes, streams end cleanly, the process exits 0.

Real processes: a `fewstep serve` gateway (embedded queue, no-op image engine at 100 ms a step,
the shipped video student) with 8 synchronous clients, 2 job event streams and a video session
running when SIGTERM arrives; and a `fewstep worker` on a real redis-server, signalled while its
running batch outlasts the reclaim timeout.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import IMAGE_ONLY, RedisServer, start_server, start_worker, stop_server, stop_worker

pytestmark = pytest.mark.slow  # server and worker processes


@dataclass
class Tally:
    """What the clients saw. `dropped`: requests sent on a connection that broke before the response."""

    statuses: Counter[int] = field(default_factory=Counter)
    dropped: list[str] = field(default_factory=list)
    refused_messages: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def sync_client(url: str, tally: Tally, stop: threading.Event, started: threading.Semaphore) -> None:
    """Requests back to back until the gateway refuses one (503: go elsewhere, as a load balancer would)."""
    first = True
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            try:
                r = http.post(url + "/v1/images/generations", json={"model": "shapes", "prompt": "a red circle"})
            except httpx.ConnectError:
                return
            except httpx.HTTPError as e:  # the server broke a request it had taken
                with tally.lock:
                    tally.dropped.append(f"{type(e).__name__}: {e}")
                return
            with tally.lock:
                tally.statuses[r.status_code] += 1
                if r.status_code != 200:
                    tally.refused_messages.add(r.json()["error"]["message"])
                    return
            if first:
                first = False
                started.release()


def event_stream(url: str, job_id: str, last: list[str], started: threading.Semaphore) -> None:
    """Read one job's SSE stream to its end; `last` gets the last event's name ("" if it broke)."""
    name = ""
    try:
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                    if name == "status":
                        started.release()
    except httpx.HTTPError as e:
        name = f"broken: {type(e).__name__}"
    last.append(name)


def video_session(url: str, outcome: list[object], started: threading.Semaphore) -> None:
    """One long stream; `outcome` gets ("done", frames) or ("closed", code, frames)."""
    frames = 0
    with connect(url.replace("http", "ws") + "/v1/video/stream", open_timeout=30) as ws:
        ws.send(json.dumps({"model": "shapes-video", "prompt": "a red circle moving left", "frames": 300}))
        try:
            while True:
                msg = json.loads(ws.recv(timeout=60))
                if msg["type"] == "done":
                    outcome.append(("done", frames))
                    return
                frames += 1
                if frames == 2:
                    started.release()
        except ConnectionClosed as closed:
            outcome.append(("closed", closed.rcvd.code if closed.rcvd else None, frames))


def test_sigterm_drains_a_loaded_gateway_and_it_exits_0(tmp_path: Path) -> None:
    env = {
        "FEWSTEP_ENGINE": "noop",
        "FEWSTEP_NOOP_STEP_MS": "100",
        "FEWSTEP_VIDEO_MAX_SESSIONS": "1",
        "FEWSTEP_VIDEO_MAX_FRAMES": "300",
        "FEWSTEP_DRAIN_S": "60",
    }
    server = start_server(tmp_path, env)
    try:
        url = server.url
        reqs = [{"prompt": "a blue square", "steps": 4, "seed": i} for i in range(200)]
        job = httpx.post(url + "/v1/jobs", json={"model": "shapes", "requests": reqs}).json()
        started, stop, tally = threading.Semaphore(0), threading.Event(), Tally()
        last_events: list[str] = []
        video: list[object] = []
        threads = [threading.Thread(target=sync_client, args=(url, tally, stop, started)) for _ in range(8)]
        threads += [threading.Thread(target=event_stream, args=(url, job["id"], last_events, started)) for _ in "ab"]
        threads.append(threading.Thread(target=video_session, args=(url, video, started)))
        for t in threads:
            t.start()
        for _ in threads:  # every client has something in flight
            assert started.acquire(timeout=120), server.output()[-3000:]

        server.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["reason"] == "shutting down"
        assert server.proc.wait(timeout=120) == 0, server.output()[-3000:]
        stop.set()
        for t in threads:
            t.join(timeout=60)

        assert tally.dropped == [], tally.dropped
        assert tally.statuses[200] >= 8 and set(tally.statuses) <= {200, 503}, tally.statuses
        assert tally.refused_messages <= {"server shutting down: retry on another instance"}
        assert sorted(last_events) == ["shutdown", "shutdown"]  # ended with a final event, not cut
        assert video and (video[0][0] == "done" or video[0][1] == 1001), video  # type: ignore[index]
        assert "Traceback" not in server.output()
    finally:
        stop_server(server)


def test_sigterm_lets_a_worker_finish_its_batch_heartbeating_and_nothing_runs_twice(
    tmp_path: Path, redis_server: RedisServer, checkpoints: Path
) -> None:
    prefix = "shutdown"
    env = {
        "FEWSTEP_REDIS_URL": redis_server.url,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_REGISTRY": str(tmp_path / "registry"),
        "FEWSTEP_CHECKPOINTS": str(checkpoints),
        "FEWSTEP_CLAIM_IDLE_S": "1.0",  # shorter than the drain below: only heartbeats keep the items
        "FEWSTEP_HEARTBEAT_S": "0.25",
        "FEWSTEP_MAX_BATCH_SIZE": "4",
        "FEWSTEP_INTERACTIVE_WORKERS": "0",
        **IMAGE_ONLY,
    }
    gateway = start_server(tmp_path, env)
    leaving = start_worker(tmp_path, env, "leaving", step_ms=4000)  # its batch: 4 steps, 16 s
    rescuer = None
    try:
        reqs = [{"prompt": "a red circle", "steps": 4, "seed": i} for i in range(4)]  # one batch, all on `leaving`
        job = httpx.post(gateway.url + "/v1/jobs", json={"model": "shapes", "requests": reqs}).json()
        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        lane = f"{prefix}:items:batch"

        def running_on_leaving() -> bool:
            try:
                return bool(r.xpending_range(lane, f"{prefix}:workers", "-", "+", 10, consumername="leaving"))
            except redis.ResponseError:  # the worker has not made the group yet
                return False

        deadline = time.monotonic() + 120
        while not running_on_leaving():
            assert time.monotonic() < deadline, leaving.output()[-3000:]
            time.sleep(0.05)
        rescuer = start_worker(tmp_path, env, "rescuer", step_ms=50)  # would take back items gone idle
        while "fewstep_queue_workers 2.0" not in httpx.get(gateway.url + "/metrics").text.splitlines():
            assert time.monotonic() < deadline, rescuer.output()[-3000:]
            time.sleep(0.1)
        assert running_on_leaving()  # still in its batch: the drain below outlasts `claim_idle_s`
        # Load on the gateway meanwhile: 8 synchronous clients (the rescuer serves them) and 2 event streams.
        started, stop, tally = threading.Semaphore(0), threading.Event(), Tally()
        last_events: list[str] = []
        clients = [threading.Thread(target=sync_client, args=(gateway.url, tally, stop, started)) for _ in range(8)]
        clients += [
            threading.Thread(target=event_stream, args=(gateway.url, job["id"], last_events, started)) for _ in "ab"
        ]
        for t in clients:
            t.start()
        for _ in clients:
            assert started.acquire(timeout=120), gateway.output()[-3000:]
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(timeout=60) == 0, leaving.output()[-3000:]
        stop.set()
        for t in clients:
            t.join(timeout=60)
        assert tally.dropped == [] and set(tally.statuses) == {200}, (tally.dropped, tally.statuses)
        deadline = time.monotonic() + 120
        while (st := httpx.get(f"{gateway.url}/v1/jobs/{job['id']}").json())["finished"] is None:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert (st["status"], st["done"]) == ("succeeded", 4)
        assert sorted(last_events) == ["end", "end"]  # both streams saw the job through
        stats = r.hgetall(f"{prefix}:stats")
        assert int(stats.get("reclaims", 0)) == 0, stats  # the drained batch was never taken back
        assert "Traceback" not in leaving.output()
    finally:
        stop_worker(leaving)
        if rescuer is not None:
            stop_worker(rescuer)
        stop_server(gateway)
