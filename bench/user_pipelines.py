"""A user's diffusers student served by fewstep vs the same diffusers pipeline called directly, in one run.

The pipeline is a tiny random SD-style one (`tests/pipelines.py`) made big enough that its UNet dominates:
channels 48/96, one attention level, 64×64 images from 32×32 latents. It is imported as a `turbo` student
(EulerAncestral, trailing timesteps, no guidance) and exported to ONNX. Each row runs side by side, in turns:

* **latency, concurrency 1**: one request at a time, step counts 1–4, every prompt new (no cache hit);
  fewstep over HTTP (`fewstep serve`, a real server process) against `pipe(prompt, num_inference_steps=n,
  guidance_scale=0)` in this process. Goal: fewstep ≤ 1.15× the pipeline's time;
* **throughput, concurrency 16**: the same list of requests (step counts mixed 1–4) sent by 16 clients at
  once to the server, against the same requests one after another through the pipeline. Goal: ≥ 1.5×;
* **the engine's own batch speed-up**: fewstep's latent engine in this process, 16 mixed items in one running
  batch against the same 16 one by one, and the UNet alone at batch 1 and 16. This is the physics the
  throughput ratio cannot beat.

Both backends of the server (torch, onnxruntime) are measured against the one pipeline (diffusers runs
torch). Every process gets the same intra-op thread count. Writes docs/benchmarks/diffusers.md.

    .venv/bin/python bench/user_pipelines.py [--repeats 5] [--requests 64] [--threads 2]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on the path, and this file is called `diffusers`: the
# repository root takes its place so that `import diffusers` finds the library.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
FEWSTEP = [sys.executable, "-m", "fewstep.cli"]

from bench._server import free_port, wait_ready  # noqa: E402  (after the path is set)

WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
GOAL_LATENCY = 1.15
GOAL_THROUGHPUT = 1.5


def prompt(i: int) -> str:
    """A prompt no earlier request used: the server's prompt cache never hits."""
    return f"a {WORDS[i % 8]} {SHAPES[(i // 8) % 6]} number {i}"


@contextmanager
def server(tmp: Path, backend: str, threads: int) -> Iterator[str]:
    """A `fewstep serve` process on the registry in `tmp` (the imported model only); its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_REGISTRY": str(tmp / "registry"),
        "FEWSTEP_CHECKPOINTS": str(tmp / "no-checkpoints"),
        "FEWSTEP_BACKEND": backend,
        "FEWSTEP_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "FEWSTEP_VIDEO_MAX_SESSIONS": "0",
        "FEWSTEP_MAX_BATCH_SIZE": "16",
        "FEWSTEP_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    with open(tmp / f"server-{backend}.log", "wb") as log:
        proc = subprocess.Popen([*FEWSTEP, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_ready(url, proc, tmp / f"server-{backend}.log", timeout_s=300)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def build(tmp: Path) -> Path:
    """The pipeline folder; the registry at tmp/registry holds it imported (`bench`) and exported to ONNX."""
    from fewstep.exporters.pipeline_onnx import export_pipeline_onnx
    from fewstep.models.importing import import_pipeline
    from fewstep.models.registry import Registry
    from tests import pipelines

    src = pipelines.sd(tmp / "pipeline", width=96)
    registry = Registry(tmp / "registry")
    name, version = import_pipeline(src, "bench", registry, family="turbo")
    art = export_pipeline_onnx(registry.version_dir(name, version))
    print(f"exported: parity {art['parity']['by_steps']}", flush=True)
    (tmp / "no-checkpoints").mkdir()
    return src


def direct_pipeline(src: Path):  # type: ignore[no-untyped-def]
    """The diffusers pipeline as its model card says to run a turbo student."""
    import diffusers

    from fewstep.models.families import FAMILIES

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src))
    turbo = FAMILIES["turbo"]
    pipe.scheduler = getattr(diffusers, turbo.scheduler).from_config({**pipe.scheduler.config, **turbo.overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_direct(pipe, i: int, steps: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    pipe(prompt(i), num_inference_steps=steps, guidance_scale=0.0, generator=torch.Generator().manual_seed(i))


def call_http(http: httpx.Client, url: str, i: int, steps: int) -> None:
    r = http.post(
        url + "/v1/images/generations", json={"model": "bench", "prompt": prompt(i), "steps": steps, "seed": i}
    )
    r.raise_for_status()


def latency(pipe, url: str, repeats: int, first: int) -> dict[int, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Median ms per step count, (pipeline, fewstep over HTTP), timed in turns."""
    times: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in (1, 2, 3, 4)}
    i = first
    with httpx.Client(timeout=300) as http:
        for n in (1, 2, 3, 4):  # untimed warm-up of both paths
            call_direct(pipe, i, n)
            call_http(http, url, i + 1, n)
            i += 2
        for _ in range(repeats):
            for n in (1, 2, 3, 4):
                t0 = time.perf_counter()
                call_direct(pipe, i, n)
                t1 = time.perf_counter()
                call_http(http, url, i + 1, n)
                t2 = time.perf_counter()
                times[n][0].append(t1 - t0)
                times[n][1].append(t2 - t1)
                i += 2
    return {n: (statistics.median(a) * 1000, statistics.median(b) * 1000) for n, (a, b) in times.items()}


def throughput(pipe, url: str, requests: int, clients: int, first: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Images/s: (the pipeline, one request after another; fewstep, `clients` at once), same requests."""
    work = [(first + k, 1 + k % 4) for k in range(requests)]
    t0 = time.perf_counter()
    for i, n in work:
        call_direct(pipe, i, n)
    direct_s = time.perf_counter() - t0

    queue = list(reversed([(i + requests, n) for i, n in work]))
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    i, n = queue.pop()
                try:
                    call_http(http, url, i, n)
                except httpx.HTTPError as e:
                    errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    return requests / direct_s, requests / served_s


def engine_physics(tmp: Path, backend: str, repeats: int) -> dict[str, float]:
    """The latent engine in this process: a running batch of 16 mixed items vs the same one by one, and the UNet
    alone at batch 1 and 16 (ms per item)."""
    import torch

    from bench._timing import interleaved_ms
    from fewstep.engines.base import ImageItem
    from fewstep.engines.latent import LatentEngine
    from fewstep.models.registry import Registry

    folder = Registry(tmp / "registry").version_dir("bench", "1")
    engine = LatentEngine(folder, backend)
    engine.load()
    items = [ImageItem(prompt(10_000 + k), seed=k, steps=1 + k % 4) for k in range(16)]
    engine.run(items)  # prompt embeddings cached: both sides below time only steps and decodes
    batched, alone = interleaved_ms(
        [lambda: engine.run(items), lambda: [engine.run([it]) for it in items]], max(2, repeats // 2)
    )
    nets = engine.sampler.nets  # type: ignore[union-attr]
    cond = engine.sampler.text([(prompt(10_000), None)])[0]  # type: ignore[union-attr]

    def unet(b: int) -> None:
        nets.unet(torch.randn(b, 4, 32, 32), torch.full((b,), 999.0), cond.states.expand(b, -1, -1), None, None, None)

    u1, u16 = interleaved_ms([lambda: unet(1), lambda: unet(16)], repeats)
    return {"run_batched_ms_per_item": batched / 16, "run_alone_ms_per_item": alone / 16,
            "unet_b1_ms": u1, "unet_b16_ms_per_item": u16 / 16}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=64, help="requests in the throughput row")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every process")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "diffusers.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-diffusers-"))
    src = build(tmp)
    pipe = direct_pipeline(src)
    rows = {}
    first = 0
    for backend in ("torch", "onnxruntime"):
        physics = engine_physics(tmp, backend, args.repeats)
        with server(tmp, backend, args.threads) as url:
            lat = latency(pipe, url, args.repeats, first)
            first += 1000
            tput = throughput(pipe, url, args.requests, args.clients, first)
            first += 1000
        rows[backend] = (lat, tput, physics)
        print(backend, lat, tput, physics, flush=True)
    report(rows, args)


def report(rows: dict, args: argparse.Namespace) -> None:  # type: ignore[type-arg]
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "# A user's diffusers student: fewstep vs the diffusers pipeline",
        "",
        f"`.venv/bin/python bench/user_pipelines.py --repeats {args.repeats} --requests {args.requests} "
        f"--clients {args.clients} --threads {args.threads}` — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, one run, {args.threads} intra-op threads in every process.",
        "",
        "A tiny random SD-style pipeline made big enough that the UNet dominates (channels 48/96, one attention",
        "level, 64×64 images from 32×32 latents), imported as a `turbo` student and exported to ONNX. The",
        "pipeline side is `StableDiffusionPipeline(prompt, num_inference_steps=n, guidance_scale=0)` in the",
        "benchmark's process with the family's scheduler; the fewstep side is a `fewstep serve` process over HTTP",
        "(PNG encoding and base64 included). Every prompt is new, so fewstep's prompt cache never helps.",
        "",
        "## Latency at concurrency 1 (median ms per image)",
        "",
        "| server backend | steps | diffusers pipeline | fewstep over HTTP | ratio (goal ≤ 1.15×) |",
        "|---|---|---|---|---|",
    ]
    for backend, (lat, _, _) in rows.items():
        for n, (d, f) in lat.items():
            lines.append(f"| {backend} | {n} | {d:.0f} | {f:.0f} | {f / d:.2f}× ({verdict(f / d <= GOAL_LATENCY)}) |")
    lines += [
        "",
        f"## Throughput at concurrency {args.clients}, step counts mixed 1–4 ({args.requests} requests)",
        "",
        "| server backend | diffusers, one after another (img/s) | fewstep, "
        f"{args.clients} clients (img/s) | ratio (goal ≥ 1.5×) |",
        "|---|---|---|---|",
    ]
    for backend, (_, (d, f), _) in rows.items():
        lines.append(f"| {backend} | {d:.2f} | {f:.2f} | {f / d:.2f}× ({verdict(f / d >= GOAL_THROUGHPUT)}) |")
    lines += [
        "",
        "## The engine's own batch speed-up (fewstep's latent engine in process; ms per image)",
        "",
        "| backend | 16 mixed items, one by one | the same 16 in one running batch | speed-up | "
        "UNet batch 1 | UNet batch 16, per item | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, (_, _, p) in rows.items():
        lines.append(
            f"| {backend} | {p['run_alone_ms_per_item']:.0f} | {p['run_batched_ms_per_item']:.0f} | "
            f"{p['run_alone_ms_per_item'] / p['run_batched_ms_per_item']:.2f}× | {p['unet_b1_ms']:.1f} | "
            f"{p['unet_b16_ms_per_item']:.1f} | {p['unet_b1_ms'] / p['unet_b16_ms_per_item']:.2f}× |"
        )
    lines += ["", "## Reading", ""]
    for backend, (_, (d, f), p) in rows.items():
        run = p["run_alone_ms_per_item"] / p["run_batched_ms_per_item"]
        unet = p["unet_b1_ms"] / p["unet_b16_ms_per_item"]
        lines.append(
            f"- {backend}: served throughput {f / d:.2f}× the pipeline's; the engine alone gains {run:.2f}× from a "
            f"running batch of 16 over one by one, the UNet alone {unet:.2f}× from batch 16 over batch 1."
        )
    lines += [
        "",
        "The served ratio is the engine's batching gain times how much faster (or slower) fewstep's single-item",
        "path is than the pipeline's, less what the server adds (HTTP, PNG, the queue) and the ramp of a closed",
        "loop of 16 clients. On torch, fewstep's single-item path costs what the pipeline's does (latency rows),",
        "so the served ratio sits a little under the engine's own batching gain: the server's share. On ONNX",
        "Runtime the UNet graph hardly batches on this CPU, and the ratio comes from the graph being faster per",
        "item than diffusers' torch UNet. What batching recovers on a CPU is per-call overhead (torch's many",
        "small kernels at batch 1); ONNX Runtime's fused graph has little of it left, so on two cores its UNet",
        "costs the same per item at batch 1 and 16, and with larger latents (self-attention over thousands of",
        "tokens) neither backend would gain from batching.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
