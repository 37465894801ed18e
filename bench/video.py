"""Streaming video: per-frame latency against frame index with the KV cache and without, time to first
frame, and frames/s with 1, 2 and 4 concurrent sessions. Writes docs/benchmarks/video.md and video.png.

* **Per-frame latency vs frame index** (engine, one session, the model's default steps). *With the
  cache*: the engine's own `advance` calls for that frame (its denoising steps plus the one forward that
  writes the frame's keys and values). *Recomputing*: no cache kept between frames; for frame f the
  whole history (frames 0 … f − 1) is run through the network again in one parallel pass to rebuild
  the keys and values (`VideoDenoiser.context_kv`), then the same denoising steps. Both are timed in
  turn at each measured frame index, so drift on the shared machine hits them alike.
* **Time to first frame and frames/s** through a real `fewstep serve` and real WebSocket clients:
  1, 2 and 4 sessions streaming at once (`FEWSTEP_VIDEO_MAX_SESSIONS=4`).

    .venv/bin/python bench/video.py [--frames 256] [--streams 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a green triangle moving right quickly"
MARKS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)


def latency_curve(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Median ms per frame at each frame index in MARKS (1-based), with the cache and recomputing."""
    import torch

    from fewstep.engines.base import StreamRequest
    from fewstep.engines.image import ImageEngine
    from fewstep.engines.video import VideoEngine
    from fewstep.models.checkpoint import read_manifest
    from fewstep.models.sampling import from_pixels
    from fewstep.models.text import TextEncoder

    torch.set_num_threads(args.threads)
    folder = ROOT / "checkpoints" / "shapes-video"
    encoder = TextEncoder()
    ref = read_manifest(folder).get("first_frame")
    image = ImageEngine(ROOT / "checkpoints" / ref["name"], encoder) if ref else None
    engine = VideoEngine(folder, encoder, capacity=1, first_frame=image)
    engine.load()
    engine.warmup()
    net = engine.net
    cfg = engine.cfg
    steps = engine.schedule.default_steps
    ts = engine.schedule.timesteps_for(steps)
    cached: dict[int, list[float]] = {m: [] for m in MARKS}
    recompute: dict[int, list[float]] = {m: [] for m in MARKS}
    # Frame 1 of an image-to-video student is drawn by the image model when the session opens: not a
    # denoised frame, so not on this curve (the served TTFF below includes it).
    marks = [m for m in MARKS if m <= args.frames and (m > 1 or image is None)]
    for stream in range(args.streams):
        session = engine.open(StreamRequest(PROMPT, args.frames, steps, stream))
        text = net.text_kv(*engine.encoder.encode([PROMPT]))
        made: list[torch.Tensor] = []
        while not session.finished:
            index = session.frame + 1
            t0 = time.perf_counter()
            frames: list = []
            while not frames:
                frames = engine.advance([session])
            if index in marks:
                cached[index].append(time.perf_counter() - t0)
                recompute[index].append(_recompute_frame(net, cfg, text, made, ts, engine, stream, index - 1))
            made.append(from_pixels(frames[0].pixels))
        engine.end(session)
        print(f"  stream {stream + 1}/{args.streams}: {args.frames} frames", flush=True)
    return {
        "cache": {m: statistics.median(cached[m]) * 1000 for m in marks},
        "recompute": {m: statistics.median(recompute[m]) * 1000 for m in marks},
    }


def _recompute_frame(net, cfg, text, made, ts, engine, seed: int, f: int) -> float:  # type: ignore[no-untyped-def]
    """Wall time of frame `f` without a kept cache: rebuild every layer's keys/values from the whole history."""
    import torch

    from fewstep.models.sampling import frame_noise
    from fewstep.models.video_cache import KVCache

    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = KVCache.empty(cfg, 1)
        if f:
            ks, vs = net.context_kv(torch.stack(made[:f])[None], text)
            keep = [*range(min(cfg.sink, f)), *range(max(cfg.sink, f - cfg.window), f)]
            for slot, frame in enumerate(keep):
                for i in range(cfg.layers):
                    span = slice(frame * cfg.tokens, (frame + 1) * cfg.tokens)
                    cache.k[i, 0, :, slot] = ks[i][0, :, span]
                    cache.v[i, 0, :, slot] = vs[i][0, :, span]
                cache.frame_of[0, slot] = frame
            cache.written[0] = f
            for j in range(min(cfg.context_frames, f)):
                cache.frames[0, j] = made[f - 1 - j]
        x = frame_noise([seed], f, 0, cfg)
        for k, t in enumerate(ts):
            tt = torch.full((1,), t)
            v = net.denoise(x, tt, text, cache)
            t_next = ts[k + 1] if k + 1 < len(ts) else None
            _, nxt = engine.schedule.step(x, tt, v, [t_next], lambda _, k=k: frame_noise([seed], f, k + 1, cfg)[0])
            if nxt[0] is not None:
                x = nxt[0][None]
        return time.perf_counter() - t0


def served(args: argparse.Namespace) -> list[dict]:
    """TTFF and frames/s through `fewstep serve` with 1, 2 and 4 concurrent WebSocket sessions."""
    from _server import free_port, wait_ready  # bench/ is on sys.path when run as a script
    from websockets.sync.client import connect

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-video-bench-"))
    env = {
        **os.environ,
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_REGISTRY": str(tmp / "registry"),
        "FEWSTEP_CHECKPOINTS": str(ROOT / "checkpoints"),
        "FEWSTEP_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "FEWSTEP_VIDEO_MAX_SESSIONS": "4",
        "FEWSTEP_EMBEDDED_WORKERS": "0",  # nothing else shares the cores
    }
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fewstep.cli", "serve"], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, tmp / "server.log", timeout_s=120)

        def one(results: list, seed: int, frames: int) -> None:
            with connect(f"ws://127.0.0.1:{port}/v1/video/stream", open_timeout=10) as ws:
                t0 = time.perf_counter()
                ws.send(json.dumps({"model": "shapes-video", "prompt": PROMPT, "frames": frames, "seed": seed}))
                first = None
                n = 0
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg["type"] == "done":
                        break
                    n += 1
                    if first is None:
                        first = time.perf_counter() - t0
                results.append({"ttff": first, "seconds": time.perf_counter() - t0, "frames": n})

        rows = []
        for sessions in (1, 2, 4):
            for _ in range(2):  # the first round warms the server's paths for this concurrency
                results: list[dict] = []
                threads = [threading.Thread(target=one, args=(results, s, args.served_frames)) for s in range(sessions)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
            frames = sum(r["frames"] for r in results)
            rows.append(
                {
                    "sessions": sessions,
                    "frames": frames,
                    "ttff_ms": statistics.median(r["ttff"] for r in results) * 1000,
                    "fps_per_session": statistics.median(r["frames"] / r["seconds"] for r in results),
                    "fps_total": frames / wall,
                }
            )
            print(f"  {sessions} sessions: {rows[-1]}", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--served-frames", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/video.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    curve = latency_curve(args)
    rows = served(args)
    _write(args, curve, rows)


def _write(args: argparse.Namespace, curve: dict[str, dict[int, float]], rows: list[dict]) -> None:
    out = Path(args.out)
    marks = sorted(curve["cache"])
    lines = [
        "| frame | with cache, ms | recomputing, ms | recompute / cache |",
        "|---|---|---|---|",
        *(
            f"| {m} | {curve['cache'][m]:.1f} | {curve['recompute'][m]:.1f} | "
            f"{curve['recompute'][m] / curve['cache'][m]:.2f} |"
            for m in marks
        ),
    ]
    last = marks[-1]
    flat = curve["cache"][last] / curve["cache"][8]
    grow = curve["recompute"][last] / curve["recompute"][8]
    served_lines = [
        "| sessions | frames | time to first frame, ms (median) | frames/s per session (median) | frames/s in all |",
        "|---|---|---|---|---|",
        *(
            f"| {r['sessions']} | {r['frames']} | {r['ttff_ms']:.0f} | {r['fps_per_session']:.1f} | "
            f"{r['fps_total']:.1f} |"
            for r in rows
        ),
    ]
    text = f"""# Streaming video: the KV cache, time to first frame, concurrent sessions

`{" ".join(["python", "bench/video.py", *sys.argv[1:]])}` on {platform.machine()}, {os.cpu_count()} CPUs (shared),
{args.threads} threads, the shipped `shapes-video` student at its default steps per frame, torch backend.
Frame 1 is the image student's (image to video), drawn when the session opens; the curve starts at frame 2.

## Per-frame latency against frame index ({args.streams} streams of {args.frames} frames; medians)

Frame {last} with the cache costs **{flat:.2f} ×** frame 8 (the cache has a static shape: an attention sink
and a rolling window of frames). Recomputing the history costs {grow:.1f} × frame 8 at frame {last}, and grows
with the stream.

{chr(10).join(lines)}

![per-frame latency](video.png)

## Through the server: `WS /v1/video/stream`, {args.served_frames} frames per session

Real WebSocket clients against `fewstep serve` (`FEWSTEP_VIDEO_MAX_SESSIONS=4`, no image worker). Time to
first frame counts from sending the first message (prompt encoding, admission, the image student's
first frame at the same steps, PNG, the socket). Sessions share the driver thread: every step boundary
advances all of them in one batch.

{chr(10).join(served_lines)}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    _plot(curve, out.with_suffix(".png"))
    print(text)


def _plot(curve: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, label in (("cache", "KV cache (sink + rolling window)"), ("recompute", "recompute the history")):
        xs = sorted(curve[name])
        ax.plot(xs, [curve[name][x] for x in xs], marker="o", label=label)
    ax.set_xlabel("frame index")
    ax.set_ylabel("ms per frame (median)")
    ax.set_yscale("log")
    ax.set_title("Per-frame latency of a stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
