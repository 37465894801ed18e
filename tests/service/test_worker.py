"""Workers on the Redis queue as production runs them: a real redis-server, a real gateway process
and real `fewstep worker` processes, killed, starved and cut off from Redis.

Where a test is about delivery rather than images, the workers run the no-op engine
(`--engine noop`, 40–150 ms per denoising step) so that "the middle of a job" lasts long
enough to act in; the last tests run the real student.
"""

from __future__ import annotations

import base64
import io
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import (
    IMAGE_ONLY,
    RedisServer,
    Server,
    WorkerProc,
    start_server,
    start_worker,
    stop_server,
    stop_worker,
)

pytestmark = pytest.mark.slow  # redis-server and worker processes

POISON_WORKER = str(Path(__file__).with_name("poison_worker.py"))


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    gateway: Server
    redis: RedisServer
    prefix: str
    workers: list[WorkerProc]

    def worker(self, name: str, **kw: object) -> WorkerProc:
        w = start_worker(self.tmp, self.env, name, **kw)  # type: ignore[arg-type]
        self.workers.append(w)
        return w

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def post_job(self, n: int, steps: int = 4, prompt: str = "a red circle", **headers: str) -> dict:
        reqs = [{"prompt": prompt, "steps": steps, "seed": i} for i in range(n)]
        r = httpx.post(self.gateway.url + "/v1/jobs", json={"model": "shapes", "requests": reqs}, headers=headers)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.gateway.url}/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, until: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = self.job(job_id)
                if until(st):
                    return st
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not there after {timeout} s: {self.job(job_id)}\n{self.logs()}")

    def results(self, job_id: str) -> dict:
        return httpx.get(f"{self.gateway.url}/v1/jobs/{job_id}/results").json()

    def queued(self) -> int:
        """Items of the batch lane not finished: in its stream (fed, or in flight) or in the keys' backlogs."""
        return int(self.r().xlen(f"{self.prefix}:items:batch")) + int(self.r().llen(f"{self.prefix}:waiting:batch"))

    def pending(self, consumer: str) -> int:
        lane = f"{self.prefix}:items:batch"
        try:
            return len(self.r().xpending_range(lane, f"{self.prefix}:workers", "-", "+", 100, consumername=consumer))
        except redis.ResponseError:  # no worker has made the group yet
            return 0

    def wait_workers(self, n: int, timeout: float = 60.0) -> None:
        """Until n workers have reported in (each imports torch and loads before its first claim)."""
        deadline = time.monotonic() + timeout
        while f"fewstep_queue_workers {n:.1f}" not in httpx.get(self.gateway.url + "/metrics").text.splitlines():
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.output()[-3000:]}" for w in self.workers) + self.gateway.output()[-3000:]


def settled(st: dict) -> bool:
    return st["done"] + st["failed"] + st["cancelled"] == st["total"]


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer, checkpoints: Path) -> Iterator[Stack]:
    prefix = f"t{secrets.token_hex(4)}"
    env = {
        "FEWSTEP_REDIS_URL": redis_server.url,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_REGISTRY": str(tmp_path / "registry"),
        "FEWSTEP_CHECKPOINTS": str(checkpoints),
        "FEWSTEP_CLAIM_IDLE_S": "1.5",
        "FEWSTEP_HEARTBEAT_S": "0.25",
        "FEWSTEP_MAX_BATCH_SIZE": "4",
        "FEWSTEP_BATCH_WAIT_MS": "0",
        "FEWSTEP_MAX_JOB_QUEUE": "100",
        **IMAGE_ONLY,
    }
    gateway = start_server(tmp_path, env)
    s = Stack(tmp_path, env, gateway, redis_server, prefix, [])
    yield s
    for w in s.workers:
        stop_worker(w)
    stop_server(gateway)


def test_kill_9_of_a_worker_mid_job_loses_nothing(stack: Stack) -> None:
    victim = stack.worker("victim", step_ms=100)
    stack.worker("survivor", step_ms=100)
    stack.wait_workers(2)
    job = stack.post_job(40)  # 40 items × 4 steps, 4 at a time on each worker: about 2 s
    deadline = time.monotonic() + 30
    while stack.pending("victim") == 0:  # kill it while it holds items
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.01)
    held = stack.pending("victim")
    os.kill(victim.proc.pid, signal.SIGKILL)
    st = stack.wait(job["id"], settled)
    assert (st["status"], st["done"], st["failed"]) == ("succeeded", 40, 0)
    data = stack.results(job["id"])["data"]
    assert [d["index"] for d in data] == list(range(40))  # exactly one result per item
    assert [d["seed"] for d in data] == list(range(40))
    metrics = httpx.get(stack.gateway.url + "/metrics").text
    reclaims = float(re.search(r"^fewstep_queue_reclaims_total (\S+)", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert held >= 1 and reclaims >= held


def test_redis_restart_mid_job_the_job_completes_and_nobody_restarts(stack: Stack) -> None:
    workers = [stack.worker("w1", step_ms=30), stack.worker("w2", step_ms=30)]
    job = stack.post_job(40)
    stack.wait(job["id"], lambda st: st["done"] >= 4)
    stack.redis.stop()
    try:
        assert httpx.get(stack.gateway.url + "/readyz").status_code == 503
        down = httpx.post(stack.gateway.url + "/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "x"}]})
        message = down.json()["error"]["message"]  # the per-key limits live in the same Redis: either says so
        assert down.status_code == 503 and re.match(r"(job queue|limits store) unreachable", message), message
        assert "Retry-After" in down.headers
        time.sleep(1.0)
    finally:
        stack.redis.start()
    st = stack.wait(job["id"], settled)
    assert (st["status"], st["done"]) == ("succeeded", 40)
    assert [d["index"] for d in stack.results(job["id"])["data"]] == list(range(40))
    assert stack.gateway.proc.poll() is None and all(w.proc.poll() is None for w in workers)
    after = stack.post_job(3, steps=1)  # the same processes serve new work
    assert stack.wait(after["id"], settled)["status"] == "succeeded"


def test_a_poison_item_is_dead_lettered_after_the_cap_and_its_neighbours_succeed(stack: Stack) -> None:
    procs = [start_worker(stack.tmp, stack.env, f"p{i}", script=POISON_WORKER) for i in range(2)]
    deaths = 0
    stop = threading.Event()

    def supervise() -> None:  # what Kubernetes does for a crashed pod
        nonlocal deaths
        while not stop.is_set():
            for i, p in enumerate(procs):
                if p.proc.poll() is not None:
                    deaths += 1
                    procs[i] = start_worker(stack.tmp, stack.env, f"p{i}-{deaths}", script=POISON_WORKER)
            time.sleep(0.1)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        reqs = [{"prompt": "a poison pill" if i == 3 else "a red circle", "steps": 1, "seed": i} for i in range(10)]
        r = httpx.post(stack.gateway.url + "/v1/jobs", json={"model": "shapes", "requests": reqs})
        job_id = r.json()["id"]
        st = stack.wait(job_id, settled, timeout=120)
    finally:
        stop.set()
        supervisor.join()
        stack.workers.extend(procs)
    assert (st["status"], st["done"], st["failed"]) == ("failed", 9, 1)
    res = stack.results(job_id)
    assert [d["index"] for d in res["data"]] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    [err] = res["errors"]
    assert err["index"] == 3 and "max_deliveries" in err["message"]
    dead = stack.r().xrange(f"{stack.prefix}:dead")
    assert len(dead) == 1 and dead[0][1]["index"] == "3" and dead[0][1]["deliveries"] == "3"
    assert deaths == 3  # the first crash, then two lone retries; no healthy item died twice


def test_the_same_idempotency_key_makes_one_job_also_concurrently(stack: Stack) -> None:
    first = stack.post_job(5, **{"Idempotency-Key": "order-17"})
    assert stack.post_job(5, **{"Idempotency-Key": "order-17"})["id"] == first["id"]
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        ids.append(stack.post_job(2, **{"Idempotency-Key": "order-18"})["id"])

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    assert stack.queued() == 5 + 2  # no worker yet: every queued item is here
    other = httpx.post(
        stack.gateway.url + "/v1/jobs",
        json={"model": "shapes", "requests": [{"prompt": "a blue square"}]},
        headers={"Idempotency-Key": "order-17"},
    )
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]["message"]


def test_cancelling_a_running_job_stops_it_within_a_step_and_frees_the_workers(stack: Stack) -> None:
    step = 0.15
    stack.worker("c1", step_ms=step * 1000)
    stack.worker("c2", step_ms=step * 1000)
    stack.wait_workers(2)
    job = stack.post_job(40)  # 10 batches of 4 items × 4 steps: about 3 s on two workers
    stack.wait(job["id"], lambda st: st["done"] >= 1)
    while stack.pending("c1") + stack.pending("c2") == 0:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert httpx.delete(f"{stack.gateway.url}/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    other = stack.post_job(4, steps=1)
    st = stack.wait(job["id"], settled, timeout=10)
    stopped_after = time.monotonic() - t0
    assert st["status"] == "cancelled" and st["cancelled"] >= 20 and st["done"] < 20
    messages = [e["message"] for e in stack.results(job["id"])["errors"]]
    assert any(re.fullmatch(r"cancelled before step [234] of 4", m) for m in messages), messages  # mid-denoise
    assert stopped_after < step + 0.6, stopped_after  # one step, plus polling slack
    assert stack.wait(other["id"], settled, timeout=5)["status"] == "succeeded"
    assert time.monotonic() - t0 < 2.0  # the freed slots ran the next job at once


def test_a_full_queue_answers_429_stays_healthy_and_recovers(stack: Stack) -> None:
    for _ in range(10):
        stack.post_job(10, steps=1)  # no worker yet: the batch lane fills to its limit of 100
    r = httpx.post(stack.gateway.url + "/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "x"}]})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "limit of 100" in r.json()["error"]["message"]
    assert httpx.get(stack.gateway.url + "/healthz").status_code == 200
    assert httpx.get(stack.gateway.url + "/readyz").status_code == 200
    stack.worker("drain")
    deadline = time.monotonic() + 60
    while stack.queued() > 90:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.05)
    assert stack.post_job(10, steps=1)["status"] == "queued"


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_real_student_through_redis_matches_the_engine(stack: Stack, encoder, checkpoints: Path) -> None:  # type: ignore[no-untyped-def]
    from fewstep.engines.base import ImageItem, ImageResult
    from fewstep.engines.image import ImageEngine

    stack.worker("student", engine="registry")
    r = httpx.post(
        stack.gateway.url + "/v1/images/generations",
        json={"model": "shapes", "prompt": "a yellow triangle", "n": 2, "steps": 3, "seed": 5},
        timeout=120,
    )
    assert r.status_code == 200, r.text + stack.logs()
    body = r.json()
    assert body["model_version"] == "1" and body["nfe"] == 3
    engine = ImageEngine(checkpoints / "shapes", encoder)
    engine.load()
    for d, seed in zip(body["data"], (5, 6), strict=True):
        [ref] = engine.run([ImageItem("a yellow triangle", seed=seed, steps=3)])
        assert isinstance(ref, ImageResult)
        assert np.abs(_pixels(d["b64_json"]).astype(int) - ref.pixels.astype(int)).max() <= 1  # batch rounding

    job = stack.post_job(6, steps=2, prompt="a green square")
    events: list[str] = []
    with httpx.stream("GET", f"{stack.gateway.url}/v1/jobs/{job['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                if events[-1] == "end":
                    break
    assert events[0] == "status" and events.count("item") == 6 and events[-1] == "end"
    assert len(stack.results(job["id"])["data"]) == 6
