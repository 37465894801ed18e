"""Closed-loop load on loopback at rising concurrency, until the server starts saying 429.

One `fewstep serve` process (embedded queue, the shipped student, default settings). At each
level, `c` clients send one-image 2-step `POST /v1/images/generations` back to back for a fixed
time. Reported per level: successful requests/s, p50 / p99 latency of the successes, responses
by status (and transport errors), and the server's resident memory before and after the run.

    .venv/bin/python bench/load.py [--levels 1,8,32,128,256] [--seconds 8] [--out docs/benchmarks/load.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from _server import start_serve  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "shapes", "prompt": "a red circle", "steps": 2}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def level(url: str, clients: int, seconds: float) -> tuple[list[float], Counter[str]]:
    """`clients` closed loops for `seconds`: latencies of 200s, and every outcome counted."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def loop(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/images/generations", json={**BODY, "seed": i * 100_000 + n})
                except httpx.HTTPError as e:
                    outcomes[type(e).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                n += 1
                outcomes[str(r.status_code)] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                elif r.status_code == 429:
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))

        await asyncio.gather(*(loop(i) for i in range(clients)))
    return latencies, outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32,128,256")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/load.md"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        url, proc, log = start_serve(Path(tmp), ROOT, {})
        try:
            asyncio.run(level(url, 4, 2.0))  # warm-up
            before = rss_mb(proc.pid)
            rows = []
            for c in levels:
                lat, outcomes = asyncio.run(level(url, c, args.seconds))
                ok = outcomes.get("200", 0)
                p50 = statistics.median(lat) * 1000 if lat else float("nan")
                p99 = sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")
                rows.append((c, ok / args.seconds, p50, p99, outcomes))
                codes = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
                print(
                    f"c={c:4d}  {ok / args.seconds:7.1f} req/s  p50 {p50:7.0f} ms  p99 {p99:7.0f} ms  {codes}",
                    flush=True,
                )
            after = rss_mb(proc.pid)
            if any(not k.isdigit() for *_, o in rows for k in o):  # transport errors: show the server's side
                print(log.read_text(errors="replace")[-3000:])
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=150)
    first_429 = next((c for c, *_, o in rows if o.get("429")), None)
    lines = [
        "# Load: closed loops at rising concurrency",
        "",
        f"Command: `python bench/load.py --levels {args.levels} --seconds {args.seconds:g}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, shared; one `fewstep serve` process (embedded queue, the "
        "shipped student on torch, default settings), clients on the same machine over loopback.",
        "",
        f"Each level: that many clients send one-image 2-step requests back to back for {args.seconds:g} s (a 429 "
        "waits its Retry-After, at most 1 s). Latency percentiles are of the 200s.",
        "",
        "| clients | requests/s (200) | p50 (ms) | p99 (ms) | responses by status |",
        "|---|---|---|---|---|",
    ]
    for c, rate, p50, p99, outcomes in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
        lines.append(f"| {c} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {codes} |")
    lines += [
        "",
        (
            f"429s first appeared at {first_429} clients: one key's synchronous work reached `key_max_sync_cost` "
            "(256 network evaluations queued or running); the server stayed up."
        )
        if first_429
        else "No 429 at these levels.",
        f"Transport errors (no HTTP response): {sum(v for *_, o in rows for k, v in o.items() if not k.isdigit())}.",
        f"Server resident memory: {before:.0f} MB after warm-up, {after:.0f} MB after the run "
        f"({after - before:+.0f} MB). Exit status after SIGTERM: {code}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
