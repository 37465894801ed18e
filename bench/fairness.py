"""Fair admission within a lane: a small job from one key behind another key's flood of the same lane.

One `fewstep serve` process (embedded queue, the shipped student, default settings), three phases:

1. **small alone**: key B submits a job of `--small` 4-step images and waits for its last result;
2. **flood alone**: key A submits a job of `--items` 4-step images;
3. **mixed**: key A submits the flood again and, right after it, key B the small job.

Without fair admission, key B's job waited behind the whole flood (a FIFO lane); with it, the keys
take turns, so B's job should finish within a small multiple of its time alone while the flood keeps
its throughput. Reported: B's seconds mixed ÷ alone, and the flood's items/s mixed ÷ alone.

    .venv/bin/python bench/fairness.py [--items 400] [--small 8] [--out docs/benchmarks/fairness.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from isolation import KEY_B, ROOT, Server, run_job  # bench/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400, help="4-step images in key A's flood")
    ap.add_argument("--small", type=int, default=8, help="4-step images in key B's job")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/fairness.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), interactive_workers=1)
        try:
            run_job(server.url, 32, 10_000)  # warm-up
            small_alone = args.small / run_job(server.url, args.small, 0, KEY_B)
            flood_alone = run_job(server.url, args.items, 0)
            flood: list[float] = []
            t = threading.Thread(target=lambda: flood.append(run_job(server.url, args.items, 0)))
            t.start()
            time.sleep(0.5)  # the flood is queued and running before key B arrives
            small_mixed = args.small / run_job(server.url, args.small, 0, KEY_B)
            t.join()
        finally:
            server.close()
    ratio, tput = small_mixed / small_alone, flood[0] / flood_alone
    print(
        f"key B's {args.small}-image job: {small_alone:.2f} s alone, {small_mixed:.2f} s behind the flood "
        f"({ratio:.2f}×); flood {flood_alone:.1f} → {flood[0]:.1f} items/s ({tput:.2f}×)",
        flush=True,
    )
    queue_s = args.items / flood_alone
    lines = [
        "# Fair admission: a small job behind another key's flood in the same lane",
        "",
        f"Command: `python bench/fairness.py --items {args.items} --small {args.small}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, shared. One `fewstep serve` process (embedded queue, the "
        "shipped student on torch, default settings).",
        "",
        f"Key A submits a job of {args.items} 4-step images; half a second later key B submits a job of "
        f"{args.small} 4-step images. Both are batch jobs, so they share one lane: without fair admission key B's "
        f"items waited behind all of key A's, about {queue_s:.0f} s at the flood's rate alone.",
        "",
        "| | seconds (key B's job) | × alone | flood items/s | × alone |",
        "|---|---|---|---|---|",
        f"| alone | {small_alone:.2f} | 1.00 | {flood_alone:.1f} | 1.00 |",
        f"| behind the flood | {small_mixed:.2f} | {ratio:.2f} | {flood[0]:.1f} | {tput:.2f} |",
        "",
        f"Key B's job took {ratio:.1f}× its time alone behind a flood that takes {queue_s:.0f} s to drain: the "
        "keys took turns at the workers' batch. The flood lost "
        f"{max(0.0, 1 - tput) * 100:.0f} % of its rate while key B's items ran.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
