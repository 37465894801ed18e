"""HTTP overhead: a 1-step image over HTTP (embedded mode) against the bare engine call, interleaved.

One `fewstep serve` process (embedded queue, the shipped student on torch, `FEWSTEP_THREADS` intra-op
threads) and, in this process, the same student in an `ImageEngine` with the same thread count. The
two are measured alternately, request by request (the order flips every round), so that drift of this
shared machine falls on both alike:

* **HTTP**: `POST /v1/images/generations` with one 1-step image, over one keep-alive connection, from
  sending the request to the parsed JSON;
* **engine**: `engine.run([item])` for the same prompt and step count, as a worker calls it.

Also timed in process, to show where the difference goes: the PNG encoding and base64 of one image
(`service.worker.encode_png`) and the response's JSON. Goal (issue "Evaluation that can fail…"):
HTTP p50 ≤ 1.25 × engine p50.

    .venv/bin/python bench/http_overhead.py [--rounds 200] [--threads 1] [--out docs/benchmarks/http_overhead.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _server import start_serve  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a red circle"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="timed requests (and engine calls)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, server and engine alike")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/http_overhead.md"))
    args = ap.parse_args()

    import torch

    from fewstep.engines.base import ImageItem, ImageResult
    from fewstep.engines.image import ImageEngine
    from fewstep.engines.pixels import encode_png
    from fewstep.models.text import TextEncoder

    torch.set_num_threads(args.threads)
    engine = ImageEngine(ROOT / "checkpoints" / "shapes", TextEncoder())
    engine.load()
    engine.warmup()

    with tempfile.TemporaryDirectory() as tmp:
        threads = {"FEWSTEP_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
        url, proc, _log = start_serve(Path(tmp), ROOT, threads)
        try:
            http_s, engine_s, png_s, json_s = [], [], [], []
            with httpx.Client(timeout=60) as http:

                def over_http(seed: int) -> None:
                    body = {"model": "shapes", "prompt": PROMPT, "steps": 1, "seed": seed}
                    t0 = time.perf_counter()
                    r = http.post(url + "/v1/images/generations", json=body)
                    r.json()
                    http_s.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise RuntimeError(f"request failed: {r.status_code} {r.text}")

                def bare(seed: int) -> None:
                    t0 = time.perf_counter()
                    (result,) = engine.run([ImageItem(PROMPT, seed, 1)])
                    engine_s.append(time.perf_counter() - t0)
                    assert isinstance(result, ImageResult)
                    t1 = time.perf_counter()
                    b64 = encode_png(result.pixels)
                    png_s.append(time.perf_counter() - t1)
                    t2 = time.perf_counter()
                    json.dumps({"created": 0, "data": [{"b64_json": b64, "seed": seed}]})
                    json_s.append(time.perf_counter() - t2)

                for i in range(20):  # warm-up of both paths
                    over_http(i)
                    bare(i)
                http_s.clear(), engine_s.clear(), png_s.clear(), json_s.clear()
                for i in range(args.rounds):
                    first, second = (over_http, bare) if i % 2 == 0 else (bare, over_http)
                    first(1000 + i)
                    second(1000 + i)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    ms = {
        k: [1000 * s for s in v] for k, v in {"http": http_s, "engine": engine_s, "png": png_s, "json": json_s}.items()
    }
    p50 = {k: statistics.median(v) for k, v in ms.items()}
    ratio = p50["http"] / p50["engine"]
    for k, v in ms.items():
        print(f"{k:7s} p50 {p50[k]:7.2f} ms  p90 {percentile(v, 0.9):7.2f} ms")
    print(f"HTTP / engine p50: {ratio:.2f}× (goal ≤ 1.25: {'met' if ratio <= 1.25 else 'missed'})")
    rest = p50["http"] - p50["engine"] - p50["png"] - p50["json"]
    lines = [
        "# HTTP overhead: a 1-step image over HTTP against the bare engine call",
        "",
        f"Command: `python bench/http_overhead.py --rounds {args.rounds} --threads {args.threads}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, shared. One `fewstep serve` process (embedded queue, the "
        f"shipped student on torch, {args.threads} intra-op thread(s) per engine thread) and the same student "
        "in an `ImageEngine` in the benchmark's process with as many threads; the two measured alternately, "
        f"{args.rounds} times each, order flipped every round.",
        "",
        "| path | p50 (ms) | p90 (ms) |",
        "|---|---|---|",
        *(f"| {k} | {p50[k]:.2f} | {percentile(v, 0.9):.2f} |" for k, v in ms.items()),
        "",
        f"HTTP p50 ÷ engine p50: **{ratio:.2f}×** (goal ≤ 1.25×: {'met' if ratio <= 1.25 else 'missed'}).",
        "",
        "*http*: request sent to JSON parsed, one keep-alive connection. *engine*: `engine.run([item])`. *png*: "
        "PNG + base64 of the image (`encode_png`). *json*: the response body's `json.dumps`.",
        "",
        f"Where the {p50['http'] - p50['engine']:.1f} ms between the medians go: PNG {p50['png']:.2f} ms, JSON "
        f"{p50['json']:.2f} ms, the remaining {rest:.1f} ms in the request's path through the gateway (parsing "
        "and validation, the queue, the worker's claim and the result's wake-up, the HTTP exchange itself).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
