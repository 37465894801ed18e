"""Image engine cost by step count and batch size (torch backend), in one run.

Prints a table and writes docs/benchmarks/image.md. Times are medians of repeated runs on
whatever machine runs this; read the ratios, not the absolute numbers.

    .venv/bin/python bench/image.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/image.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from fewstep.engines.base import ImageItem
    from fewstep.engines.image import ImageEngine
    from fewstep.models.text import TextEncoder

    torch.set_num_threads(args.threads)
    engine = ImageEngine(ROOT / "checkpoints" / "shapes", TextEncoder())
    engine.load()
    engine.warmup()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    base = None
    for steps in engine.spec.steps:
        for b in batches:
            items = [ImageItem(f"a red circle {i % 4}", seed=i, steps=steps) for i in range(b)]
            engine.run(items)  # warm this shape
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine.run(items)
                times.append(time.perf_counter() - t0)
            per_image = statistics.median(times) / b * 1000
            if base is None:
                base = per_image
            rows.append((steps, b, statistics.median(times) * 1000, per_image, per_image / base))
            print(
                f"steps {steps} batch {b:3d}: {rows[-1][2]:8.1f} ms/batch {per_image:7.2f} ms/image "
                f"({per_image / base:.2f}× 1-step batch-1)",
                flush=True,
            )
    lines = [
        "# Image engine: cost by steps and batch size",
        "",
        f"`python bench/image.py --repeats {args.repeats} --threads {args.threads}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, backend torch fp32, model `shapes` "
        f"version {engine.spec.version}. Medians of {args.repeats} runs; machines here are shared, so compare "
        "ratios within this table, not absolute times across runs.",
        "",
        "| steps (NFE) | batch | ms / batch | ms / image | × (1 step, batch 1) per image |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {b} | {t:.1f} | {p:.2f} | {r:.2f} |" for s, b, t, p, r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
