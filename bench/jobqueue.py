"""Throughput of batch jobs through gateway + Redis + 1 and 2 workers against the embedded path, in one run.

Every configuration is real processes on this machine: a fresh redis-server (AOF on, as
deployed), a `fewstep serve` gateway and `fewstep worker` processes, one intra-op thread each.
The embedded path is one gateway with its in-process worker. Each is measured with the no-op
engine (what the plumbing costs by itself) and with the real student, on the same job:

* items/s: a job of N images submitted with `POST /v1/jobs`, timed until its last result;
* sync p50: median latency of a synchronous one-image `POST /v1/images/generations`.

Ratios are against the embedded path with the same engine. Writes docs/benchmarks/queue.md
and queue.png. (Not named queue.py: in bench/ that name would shadow the standard library's
`queue` module for every other benchmark script.)

    .venv/bin/python bench/jobqueue.py [--repeats 3] [--noop-items 2000] [--student-items 400]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _server import free_port  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
FEWSTEP = [sys.executable, "-m", "fewstep.cli"]


@dataclass
class Config:
    label: str
    engine: str  # noop | registry
    workers: int  # 0: embedded path


class Stack:
    """The processes of one configuration; `close()` stops them all."""

    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.http = httpx.Client(timeout=60)  # one client: a new one per request costs ~20 ms of set-up here
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "FEWSTEP_PORT": str(port),
            "FEWSTEP_REGISTRY": str(tmp / "registry"),
            "FEWSTEP_CHECKPOINTS": str(ROOT / "checkpoints"),
            "FEWSTEP_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "FEWSTEP_ENGINE": cfg.engine,
            "FEWSTEP_MAX_JOB_ITEMS": "100000",
            "FEWSTEP_MAX_JOB_QUEUE": "100000",
            "FEWSTEP_MAX_BODY_BYTES": str(16 * 1024 * 1024),
            "FEWSTEP_LOG_LEVEL": "warning",
        }
        if cfg.workers:
            redis_port = free_port()
            (tmp / "redis").mkdir()
            server = shutil.which("redis-server") or "redis-server"
            redis = [server, "--port", str(redis_port), "--dir", str(tmp / "redis"), "--appendonly", "yes"]
            self._spawn([*redis, "--save", ""], env, tmp / "redis.log")
            env["FEWSTEP_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            time.sleep(0.5)
        self._spawn([*FEWSTEP, "serve"], env, tmp / "gateway.log")
        for i in range(cfg.workers):
            self._spawn([*FEWSTEP, "worker", "--name", f"bench-{i}"], env, tmp / f"worker-{i}.log")
        self._wait_ready(cfg.workers)

    def _spawn(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))

    def _wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    metrics = httpx.get(self.url + "/metrics").text
                    live = [ln for ln in metrics.splitlines() if ln.startswith("fewstep_queue_workers ")]
                    if not workers or (live and float(live[0].split()[1]) >= workers):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("stack not ready")

    def job_items_per_s(self, n: int, steps: int) -> float:
        reqs = [{"prompt": "a red circle", "steps": steps, "seed": i} for i in range(n)]
        t0 = time.perf_counter()
        r = self.http.post(self.url + "/v1/jobs", json={"model": "shapes", "requests": reqs})
        assert r.status_code == 202, r.text
        job = r.json()
        while True:
            st = self.http.get(f"{self.url}/v1/jobs/{job['id']}").json()
            if st["finished"] is not None:
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        assert st["done"] == n, st
        return n / elapsed

    def sync_ms(self, steps: int, repeats: int) -> float:
        times = []
        body = {"model": "shapes", "prompt": "a blue square", "steps": steps, "seed": 1}
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = self.http.post(self.url + "/v1/images/generations", json=body)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        return statistics.median(times) * 1000

    def close(self) -> None:
        self.http.close()
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noop-items", type=int, default=2000)
    ap.add_argument("--student-items", type=int, default=400)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sync-repeats", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/queue.md"))
    args = ap.parse_args()
    configs = [
        Config(label, engine, workers)
        for engine in ("noop", "registry")
        for label, workers in (("embedded", 0), ("redis + 1 worker", 1), ("redis + 2 workers", 2))
    ]
    rows = []
    for cfg in configs:
        n = args.noop_items if cfg.engine == "noop" else args.student_items
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(cfg, Path(tmp))
            try:
                stack.job_items_per_s(min(n, 64), args.steps)  # warm-up: caches, connections, first batches
                rates = [stack.job_items_per_s(n, args.steps) for _ in range(args.repeats)]
                sync = stack.sync_ms(args.steps, args.sync_repeats)
            finally:
                stack.close()
        rate = statistics.median(rates)
        rows.append((cfg, n, rate, sync))
        print(f"{cfg.engine:6} {cfg.label:18} {n:6d} items  {rate:8.1f} items/s  sync p50 {sync:7.1f} ms", flush=True)

    base = {cfg.engine: (rate, sync) for cfg, _, rate, sync in rows if cfg.workers == 0}
    engine_name = {"noop": "no-op", "registry": "student (torch fp32)"}
    lines = [
        "# Job queue throughput: gateway + Redis + workers vs the embedded path",
        "",
        f"Command: `python bench/jobqueue.py --repeats {args.repeats} --noop-items {args.noop_items} "
        f"--student-items {args.student_items} --steps {args.steps}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, shared; every process one intra-op thread; "
        f"{args.steps} steps per image; batches up to the default `max_batch_size` (16).",
        "",
        "items/s: one job of N images through `POST /v1/jobs` until its last result (median of "
        f"{args.repeats}). sync p50: median of {args.sync_repeats} one-image `POST /v1/images/generations`. "
        "Ratios against the embedded path with the same engine.",
        "",
        "| engine | path | items | items/s | × embedded | sync p50 (ms) | × embedded |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg, n, rate, sync in rows:
        b_rate, b_sync = base[cfg.engine]
        lines.append(
            f"| {engine_name[cfg.engine]} | {cfg.label} | {n} | {rate:.1f} | {rate / b_rate:.2f} | "
            f"{sync:.1f} | {sync / b_sync:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    _plot(rows, out.with_suffix(".png"), engine_name)


def _plot(rows: list, path: Path, names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, engine in zip(axes, ("noop", "registry"), strict=True):
        sub = [(cfg.label, rate) for cfg, _, rate, _ in rows if cfg.engine == engine]
        ax.bar([label for label, _ in sub], [rate for _, rate in sub], color=["#888", "#4a7", "#2a5"])
        ax.set_title(f"{names[engine]} engine")
        ax.set_ylabel("items/s")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
