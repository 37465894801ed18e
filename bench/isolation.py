"""Interactive requests beside a batch flood: one key's synchronous latency, another key's job throughput.

One `fewstep serve` process (embedded queue, the shipped student, default settings otherwise)
per configuration, measured in three phases on the same server:

1. **sync alone**: key B sends one-image 1-step `POST /v1/images/generations` back to back;
2. **batch alone**: key A submits one job of N 4-step images and waits for its last result;
3. **mixed**: the same job again, while key B keeps sending synchronous requests until it ends.

Goals (issue "Abuse resistance, fair sharing…"): in the mixed phase key B's p99 within 2× of its p99
alone, and the job's items/s at least 0.8× of its rate alone. The configurations differ only in
`FEWSTEP_INTERACTIVE_WORKERS` (0: one worker serves both lanes, as before; 1: an interactive-only
worker beside it, the default), so the table compares them side by side in one run.

    .venv/bin/python bench/isolation.py [--items 400] [--out docs/benchmarks/isolation.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _server import free_port, wait_ready  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "bench-key-batch-aaaaaaaaaaaa", "bench-key-sync-bbbbbbbbbbbbbb"


@dataclass
class Phase:
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    items_per_s: float = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Server:
    def __init__(self, tmp: Path, interactive_workers: int) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "FEWSTEP_PORT": str(port),
            "FEWSTEP_REGISTRY": str(tmp / "registry"),
            "FEWSTEP_CHECKPOINTS": str(ROOT / "checkpoints"),
            "FEWSTEP_API_KEYS": f"{KEY_A},{KEY_B}",
            "FEWSTEP_INTERACTIVE_WORKERS": str(interactive_workers),
            "FEWSTEP_VIDEO_MAX_SESSIONS": "0",
            "FEWSTEP_LOG_LEVEL": "warning",
        }
        env.pop("FEWSTEP_THREADS", None)  # the default: the cores shared among the engine threads
        env.pop("OMP_NUM_THREADS", None)
        self.log = tmp / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fewstep.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_ready(self.url, self.proc, self.log)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sync_loop(url: str, stop: threading.Event, latencies: list[float], count: int | None = None) -> None:
    """Key B: one-image 1-step requests back to back until `stop` (or `count` requests)."""
    headers = {"Authorization": f"Bearer {KEY_B}"}
    with httpx.Client(timeout=120, headers=headers) as http:
        i = 0
        while not stop.is_set() and (count is None or i < count):
            body = {"model": "shapes", "prompt": "a blue square", "steps": 1, "seed": i}
            t0 = time.perf_counter()
            r = http.post(url + "/v1/images/generations", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"sync request failed: {r.status_code} {r.text}")
            i += 1


def run_job(url: str, items: int, seed0: int, key: str = KEY_A) -> float:
    """Key A (or `key`): one job of `items` 4-step images; items/s from submission to its last result."""
    headers = {"Authorization": f"Bearer {key}"}
    reqs = [{"prompt": "a red circle", "steps": 4, "seed": seed0 + i} for i in range(items)]
    with httpx.Client(timeout=120, headers=headers) as http:
        t0 = time.perf_counter()
        r = http.post(url + "/v1/jobs", json={"model": "shapes", "requests": reqs})
        if r.status_code != 202:
            raise RuntimeError(f"job refused: {r.status_code} {r.text}")
        job = r.json()["id"]
        while True:
            st = http.get(f"{url}/v1/jobs/{job}").json()
            if st["finished"] is not None:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    if st["done"] != items:
        raise RuntimeError(f"job incomplete: {st}")
    return items / elapsed


def measure(interactive_workers: int, items: int, sync_requests: int) -> dict[str, Phase]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), interactive_workers)
        try:
            warm: list[float] = []
            sync_loop(server.url, threading.Event(), warm, 10)
            run_job(server.url, 32, 10_000)

            alone: list[float] = []
            sync_loop(server.url, threading.Event(), alone, sync_requests)
            batch_alone = run_job(server.url, items, 0)

            mixed: list[float] = []
            stop = threading.Event()
            client = threading.Thread(target=sync_loop, args=(server.url, stop, mixed))
            client.start()
            batch_mixed = run_job(server.url, items, 0)
            stop.set()
            client.join()
        finally:
            server.close()
    ms = [1000 * s for s in alone], [1000 * s for s in mixed]
    return {
        "sync alone": Phase(statistics.median(ms[0]), percentile(ms[0], 0.99), len(ms[0])),
        "batch alone": Phase(items_per_s=batch_alone),
        "mixed": Phase(statistics.median(ms[1]), percentile(ms[1], 0.99), len(ms[1]), batch_mixed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400, help="4-step images in key A's job")
    ap.add_argument("--sync-requests", type=int, default=200, help="key B's requests in the 'alone' phase")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/isolation.md"))
    args = ap.parse_args()
    rows = []
    for workers in (0, 1):
        r = measure(workers, args.items, args.sync_requests)
        p99 = r["mixed"].p99_ms / r["sync alone"].p99_ms
        tput = r["mixed"].items_per_s / r["batch alone"].items_per_s
        rows.append((workers, r, p99, tput))
        a = r["sync alone"]
        print(
            f"interactive_workers={workers}: sync p50/p99 alone {a.p50_ms:.0f}/{a.p99_ms:.0f}"
            f" ms, mixed {r['mixed'].p50_ms:.0f}/{r['mixed'].p99_ms:.0f} ms ({p99:.2f}×); job "
            f"{r['batch alone'].items_per_s:.1f} → {r['mixed'].items_per_s:.1f} items/s ({tput:.2f}×)",
            flush=True,
        )
    lines = [
        "# Interactive isolation: synchronous requests beside a batch flood",
        "",
        f"Command: `python bench/isolation.py --items {args.items} --sync-requests {args.sync_requests}`. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, shared. One `fewstep serve` process per row "
        "(embedded queue, the shipped student on torch, `FEWSTEP_THREADS` unset: the general worker has every core "
        "while the interactive lane is all that runs, and each engine thread an even share while batch items run).",
        "",
        "Key B sends one-image 1-step synchronous requests back to back (one client); key A submits one job of "
        f"{args.items} 4-step images. *Alone*: each by itself; *mixed*: key B keeps sending while key A's job "
        "runs, from submission to its last result. Goals: key B's p99 mixed ≤ 2× its p99 alone; the job's "
        "items/s mixed ≥ 0.8× alone.",
        "",
        "| interactive-only workers | sync p50 / p99 alone (ms) | sync p50 / p99 mixed (ms) | p99 × alone "
        "(goal ≤ 2) | job items/s alone | job items/s mixed | × alone (goal ≥ 0.8) | sync requests mixed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workers, r, p99, tput in rows:
        a, b, m = r["sync alone"], r["batch alone"], r["mixed"]
        lines.append(
            f"| {workers}{' (default)' if workers == 1 else ''} | {a.p50_ms:.0f} / {a.p99_ms:.0f} | "
            f"{m.p50_ms:.0f} / {m.p99_ms:.0f} | {p99:.2f} {'met' if p99 <= 2 else 'missed'} | "
            f"{b.items_per_s:.1f} | {m.items_per_s:.1f} | {tput:.2f} {'met' if tput >= 0.8 else 'missed'} | "
            f"{m.requests} |"
        )
    base = rows[0][1]["batch alone"].items_per_s
    lines += [
        "",
        f"The job alone with an interactive-only worker beside it runs at "
        f"{rows[1][1]['batch alone'].items_per_s / base:.2f}× its rate with one worker: while batch items run, the "
        "interactive-only worker's share of the cores is kept for synchronous requests.",
    ]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
