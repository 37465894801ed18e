"""Videos as jobs: clips per minute from a few-step Wan student, fewstep against sequential `WanPipeline` calls,
in one run. Writes docs/benchmarks/videos.md (and videos.png).

The student is a tiny random WanPipeline (`tests/pipelines.py::wan`: the tiny Wan VAE and UMT5) whose transformer
is rebuilt bigger so that it dominates a clip's cost (`--layers` blocks of `--heads` heads of `--head-dim`), imported
as a `wan-lightning` student (4 steps: LightX2V's timesteps, plain Euler, no guidance) at `--size`² with clips of
`--frames` pixel frames, prompts padded to 16 tokens. Every clip has a prompt no earlier clip used (fewstep's prompt
cache never hits; the pipeline encodes every prompt anyway). Each round runs every side on `--clips` clips, in turn,
so that the shared machine's drift hits them alike; clips/min is the median of the rounds', a ratio the
median of the rounds' ratios.

* **WanPipeline, sequential**: `WanPipeline.__call__` in this process, one clip after another, with the family's
  schedule as the parity test drives it (`tests/engines/test_wan_clip.py`: its scheduler, the clip's starting noise
  given), `output_type="np"`;
* **engine, in process** (`WanClipEngine`): concurrency 1 (one session at a time) and 4 (four sessions open,
  advanced together one step per call; a finished one is replaced at once);
* **served over HTTP**: a `fewstep serve` process, the official `openai` SDK (`videos.create_and_poll`, then
  `download_content`), 1 and 4 client threads: the queue, the clip driver, MP4 encoding and the download included.

Every side runs torch on `--threads` intra-op threads (the server: `FEWSTEP_THREADS`). The server makes up to 4 clips
at once (`FEWSTEP_VIDEO_MAX_CLIPS=4`; the default is 2) and has no video gate (`FEWSTEP_VIDEO_GATE_STREAMS=0`: its
probes would only lengthen the start-up).

    .venv/bin/python bench/videos.py [--clips 6] [--rounds 3] [--frames 17] [--size 64] [--layers 8] [--heads 12]
                               [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._server import clean_serve  # noqa: E402  (after the path is set)

FAMILY = "wan-lightning"
STEPS = 4
TOKENS = 16
"""Prompts' padded length (the parity test's)."""
POLL_MS = 100
"""The SDK's poll interval for `create_and_poll` (its default is 1 s: fewstep sends no `openai-poll-after-ms`)."""
GOAL_SERVED = 0.8
"""Served concurrency 1 against the sequential pipeline, clips/min: at least this."""
GOAL_BATCH = 1.5
"""Served concurrency 4 against served concurrency 1, clips/min: at least this."""
SIDES = ("pipeline", "engine-1", "engine-4", "served-1", "served-4")
LABELS = {
    "pipeline": "WanPipeline, sequential",
    "engine-1": "fewstep engine in process, concurrency 1",
    "engine-4": "fewstep engine in process, concurrency 4",
    "served-1": "fewstep served (HTTP, SDK), concurrency 1",
    "served-4": "fewstep served (HTTP, SDK), concurrency 4",
}
Timing = tuple[float, list[float]]
"""(wall seconds for all clips, each clip's seconds from its start to its last frame, or its MP4 downloaded)."""

_counter = iter(range(10**9))


def prompt() -> str:
    """A prompt no earlier clip of this run used."""
    i = next(_counter)
    return f"a {('red', 'green', 'blue', 'white')[i % 4]} fox running in the snow, take {i}"


def build(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The pipeline folder (the tiny WanPipeline with the bigger transformer) and the imported version's folder;
    the registry at tmp/registry holds the version (`bench`)."""
    import diffusers
    import torch

    from fewstep.models.importing import import_clip_video
    from fewstep.models.registry import Registry
    from tests import pipelines

    src = pipelines.wan(tmp / "wan")
    torch.manual_seed(1)
    width = args.heads * args.head_dim
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=4 * width, num_layers=args.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    for old in (src / "transformer").iterdir():
        old.unlink()
    transformer.save_pretrained(str(src / "transformer"), safe_serialization=True)
    registry = Registry(tmp / "registry")
    name, version = import_clip_video(
        src, "bench", registry, FAMILY, size=(args.size, args.size), frames=args.frames, max_tokens=TOKENS
    )
    (tmp / "no-checkpoints").mkdir()
    return src, registry.version_dir(name, version)


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int, int]:
    return (16, 1 + (args.frames - 1) // 4, args.size // 8, args.size // 8)


def wan_pipeline(src: Path, args: argparse.Namespace) -> Callable[[str, int], Any]:
    """`WanPipeline.__call__` under the family's schedule, as the parity test drives it: (prompt, seed) → the clip's
    frames (float, frames × h × w × 3)."""
    import diffusers
    import torch

    from fewstep.models.schedules import item_noise
    from tests.engines.test_wan_clip import SCHEDULERS

    pipe = diffusers.WanPipeline.from_pretrained(str(src), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    shape = latent_shape(args)

    def call(text: str, seed: int) -> Any:
        scheduler, start = SCHEDULERS[FAMILY](STEPS, seed)
        pipe.scheduler = scheduler
        latents = item_noise(seed, 0, shape)[None] * start
        return pipe(
            text, height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=STEPS,
            guidance_scale=1.0, latents=latents, output_type="np", max_sequence_length=TOKENS,
        ).frames[0]  # fmt: skip

    return call


def pipeline_side(call: Callable[[str, int], Any], clips: int) -> Timing:
    each = []
    t0 = time.perf_counter()
    for seed in range(clips):
        t = time.perf_counter()
        call(prompt(), seed)
        each.append(time.perf_counter() - t)
    return time.perf_counter() - t0, each


CALLS: dict[int, dict[str, list[float]]] = {}
"""The engine's `advance` calls in seconds by concurrency: `step` (no clip finished) and `last` (the last step, and
the VAE decode of the clips it finished)."""


def engine_side(engine: Any, clips: int, concurrency: int, frames: int) -> Timing:
    """`clips` clips with up to `concurrency` sessions open and advanced together; a finished one is replaced before
    the next step."""
    from fewstep.engines.base import StreamRequest

    calls = CALLS.setdefault(concurrency, {"step": [], "last": []})

    each: list[float] = []
    opened: dict[int, float] = {}
    live: list[Any] = []
    started = 0
    t0 = time.perf_counter()
    while started < clips or live:
        while started < clips and len(live) < concurrency:
            session = engine.open(StreamRequest(prompt(), frames, STEPS, started))
            opened[id(session)] = time.perf_counter()
            live.append(session)
            started += 1
        t = time.perf_counter()
        engine.advance(live)
        took = time.perf_counter() - t
        calls["last" if any(s.finished for s in live) else "step"].append(took)
        for session in [s for s in live if s.finished or s.error is not None]:
            if session.error is not None:
                raise RuntimeError(f"a clip failed: {session.error}")
            each.append(time.perf_counter() - opened.pop(id(session)))
            engine.end(session)
            live.remove(session)
    return time.perf_counter() - t0, each


def served_side(url: str, clips: int, concurrency: int, args: argparse.Namespace) -> Timing:
    """`clips` videos made by `concurrency` SDK clients at once, each creating, polling and downloading its MP4."""
    import openai

    from fewstep.engines.mp4 import decode_mp4

    warnings.filterwarnings("ignore", "The Sora API", DeprecationWarning)  # the SDK's notice on its own methods
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-without-auth", max_retries=0, timeout=300)
    seconds = f"{args.frames / 16:g}"  # Wan's 16 fps: this many seconds is `--frames` frames
    todo = list(range(clips))
    each: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    checked = threading.Event()

    def worker() -> None:
        while True:
            with lock:
                if not todo or failures:
                    return
                seed = todo.pop(0)
            t = time.perf_counter()
            video = client.videos.create_and_poll(
                model="bench", prompt=prompt(), seconds=seconds, size=f"{args.size}x{args.size}",  # type: ignore[arg-type]
                extra_body={"steps": STEPS, "seed": seed}, poll_interval_ms=POLL_MS,
            )  # fmt: skip
            mp4 = client.videos.download_content(video.id).content if video.status == "completed" else b""
            took = time.perf_counter() - t
            with lock:
                if video.status != "completed":
                    failures.append(f"{video.id}: {video.status} {video.error}")
                    return
                each.append(took)
                first = not checked.is_set()
                checked.set()
            if first:
                decoded = decode_mp4(mp4)
                if len(decoded) != args.frames or decoded[0].shape != (args.size, args.size, 3):
                    failures.append(f"the MP4 holds {len(decoded)} frames of {decoded[0].shape}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        raise RuntimeError(f"served videos failed: {failures}")
    return time.perf_counter() - t0, each


def parity(call: Callable[[str, int], Any], engine: Any, args: argparse.Namespace) -> float:
    """The largest gap, in levels of 255, between the pipeline's clip and the engine's for one prompt and seed."""
    import numpy as np

    from fewstep.engines.base import StreamRequest

    text = "a red fox running in the snow"
    theirs = np.asarray(call(text, 3))
    session = engine.open(StreamRequest(text, args.frames, STEPS, 3))
    frames = []
    while not session.finished:
        frames += engine.advance([session])
    engine.end(session)
    ours = np.stack([f.pixels for f in sorted(frames, key=lambda f: f.index)])
    return float(np.abs(ours.astype(float) - theirs * 255.0).max())


def run(args: argparse.Namespace) -> tuple[dict[str, list[Timing]], float]:
    import torch

    from fewstep.engines.wan_clip import WanClipEngine

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-videos-bench-"))
    src, folder = build(tmp, args)
    call = wan_pipeline(src, args)
    engine = WanClipEngine(folder, capacity=4)
    engine.load()
    engine.warmup()
    gap = parity(call, engine, args)
    print(f"parity: the engine's clip is within {gap:.0f}/255 of WanPipeline's", flush=True)
    env = {
        "FEWSTEP_THREADS": str(args.threads),
        "FEWSTEP_VIDEO_MAX_SESSIONS": "4",
        "FEWSTEP_VIDEO_MAX_CLIPS": "4",
        "FEWSTEP_VIDEO_GATE_STREAMS": "0",
    }
    out: dict[str, list[Timing]] = {side: [] for side in SIDES}
    with clean_serve(tmp, env, "server-videos.log") as url:
        served_side(url, 2, 2, args)  # untimed: the server's first clips (its first calls, the encoder)
        call(prompt(), 0)
        for r in range(args.rounds):
            sides: dict[str, Callable[[], Timing]] = {
                "pipeline": lambda: pipeline_side(call, args.clips),
                "engine-1": lambda: engine_side(engine, args.clips, 1, args.frames),
                "engine-4": lambda: engine_side(engine, args.clips, 4, args.frames),
                "served-1": lambda: served_side(url, args.clips, 1, args),
                "served-4": lambda: served_side(url, args.clips, 4, args),
            }
            for side, measure in sides.items():
                out[side].append(measure())
                wall = out[side][-1][0]
                print(f"round {r + 1}: {side}: {60 * args.clips / wall:.1f} clips/min", flush=True)
    engine.close()
    return out, gap


def rate(timing: Timing) -> float:
    wall, each = timing
    return 60 * len(each) / wall


def ratio(out: dict[str, list[Timing]], side: str, against: str) -> float:
    """The median over rounds of `side`'s clips/min over `against`'s in the same round."""
    return statistics.median(rate(a) / rate(b) for a, b in zip(out[side], out[against], strict=True))


def write(out: dict[str, list[Timing]], gap: float, args: argparse.Namespace) -> None:
    rates = {side: statistics.median(rate(t) for t in ts) for side, ts in out.items()}
    p50 = {side: statistics.median(x for t in ts for x in t[1]) for side, ts in out.items()}
    served, batch = ratio(out, "served-1", "pipeline"), ratio(out, "served-4", "served-1")
    engine_batch = ratio(out, "engine-4", "engine-1")

    share = 4 * statistics.median(CALLS[1]["step"]) / p50["engine-1"]

    def ms(concurrency: int, kind: str) -> str:
        return f"{statistics.median(CALLS[concurrency][kind]) * 1000:.0f}"

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    tokens = (1 + (args.frames - 1) // 4) * (args.size // 16) ** 2
    lines = [
        "# Videos: clips per minute, fewstep against sequential WanPipeline calls",
        "",
        f"`.venv/bin/python bench/videos.py --clips {args.clips} --rounds {args.rounds} --frames {args.frames} "
        f"--size {args.size} --layers {args.layers} --heads {args.heads} --head-dim {args.head_dim} "
        f"--threads {args.threads}` — {platform.machine()}, {args.threads} torch threads on every side, CPU, "
        f"{datetime.date.today().isoformat()}, one run. The machine's 2 cores are shared with other work: absolute "
        "figures move between runs; the ratios compare sides of the same run, each round running every side in turn.",
        "",
        f"The student: the tiny WanPipeline of the tests (`tests/pipelines.py::wan`: the tiny Wan VAE and UMT5) with "
        f"its transformer rebuilt bigger so that it dominates ({args.layers} blocks of {args.heads} heads of "
        f"{args.head_dim}, feed-forward {4 * args.heads * args.head_dim}), imported as a `{FAMILY}` student "
        f"({STEPS} steps, no guidance) at {args.size}×{args.size}; every clip {args.frames} frames "
        f"({1 + (args.frames - 1) // 4} latent frames, {tokens} tokens), a prompt no earlier clip used, padded to "
        f"{TOKENS} tokens. {args.clips} clips per side per round, {args.rounds} rounds; clips/min is the median "
        "of the rounds', a ratio the median of the rounds' ratios (each round's sides ran within a minute or so of "
        "each other), seconds per clip the median over every clip of every round.",
        "",
        "- **WanPipeline, sequential**: `WanPipeline(prompt, num_inference_steps=4, guidance_scale=1.0, latents=…, "
        "output_type=\"np\")` in the benchmark's process, the family's scheduler as the parity test "
        "(`tests/engines/test_wan_clip.py`) drives it, one clip after another.",
        "- **engine in process**: `WanClipEngine`, concurrency 1 (one session at a time) and 4 (four sessions advanced "
        "together, one batched network call per step; a finished clip is replaced at once). No HTTP, no MP4.",
        "- **served**: a `fewstep serve` process (`FEWSTEP_THREADS` as above, `FEWSTEP_VIDEO_MAX_CLIPS=4`: the "
        "default 2 would cap concurrency 4 at 2, `FEWSTEP_VIDEO_GATE_STREAMS=0`), the official `openai` SDK: "
        f"`videos.create_and_poll(..., poll_interval_ms={POLL_MS})` then `download_content`, from 1 and 4 client "
        "threads. A clip's time runs from `create` to its MP4 downloaded: the queue, the clip driver, H.264 "
        "encoding and the polling included. The first MP4 of each served side is decoded and checked "
        f"({args.frames} frames of {args.size}×{args.size}).",
        "",
        f"Parity in this run: the engine's clip is within {gap:.0f}/255 of WanPipeline's for the same prompt and seed.",
        "",
        "| side | clips/min, each round | clips/min, median | × WanPipeline (median of rounds) | s per clip, p50 |",
        "|---|---|---|---|---|",
    ]
    for side in SIDES:
        each = ", ".join(f"{rate(t):.1f}" for t in out[side])
        against = ratio(out, side, "pipeline")
        lines.append(f"| {LABELS[side]} | {each} | {rates[side]:.1f} | {against:.2f}× | {p50[side]:.2f} |")
    lines += [
        "",
        "## Goals",
        "",
        "The issue (33) set none in numbers; these say that serving costs little and that batching across requests "
        "pays.",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| served, concurrency 1 ≥ {GOAL_SERVED}× the sequential pipeline's clips/min | {served:.2f}× | "
        f"{verdict(served >= GOAL_SERVED)} |",
        f"| served, concurrency 4 ≥ {GOAL_BATCH}× served concurrency 1 | {batch:.2f}× | "
        f"{verdict(batch >= GOAL_BATCH)} |",
        "",
        "## Reading",
        "",
        f"- The engine alone gains {engine_batch:.2f}× from four sessions per call over one; served, concurrency 4 "
        f"gains {batch:.2f}× over concurrency 1. In the engine, over the whole run, a denoising call takes "
        f"{ms(1, 'step')} ms with one clip and {ms(4, 'step')} ms with four; a call that finishes a clip (its last "
        f"step and the VAE decode of its {args.frames} frames) {ms(1, 'last')} ms with one, {ms(4, 'last')} ms "
        f"with four: at concurrency 1 the network's four calls are {share:.0%} of a clip's time in the engine, the "
        "rest the VAE decode and the prompt. What batching recovers on a CPU is per-call overhead (torch's many "
        "small kernels at a small batch); the decode is per clip whatever the batch.",
        f"- Served, concurrency 4 gains {batch:.2f}× over concurrency 1 where the engine alone gains "
        f"{engine_batch:.2f}× from four sessions per call: the batching goal ({GOAL_BATCH}×) asks more than the "
        "engine's own batching gives on this CPU, so no serving path can meet it here; what bounds it is the "
        "engine (the per-clip VAE decode, and a CPU's small gain from a larger batch). What serving adds between "
        "clips: the clip driver (`service/clips.py`) encodes each finished clip's MP4 and writes its result on its "
        "own thread, and a client sees its clip done at its next poll (every "
        f"{POLL_MS} ms here) before it downloads it and asks for the next; a video queued on this gateway wakes "
        "the driver at once.",
        f"- Served at concurrency 1, a clip takes {p50['served-1']:.2f} s (p50) from `create` to its MP4 "
        f"downloaded, against {p50['engine-1']:.2f} s in the engine alone (`open` to its last frame) and "
        f"{p50['pipeline']:.2f} s per `WanPipeline` call. The served figure includes the SDK's polling "
        f"({POLL_MS} ms here; at the SDK's default of 1 s, a clip this short waits up to a second more).",
    ]
    lines += [
        "",
        "## Other runs",
        "",
        "Three earlier runs this session, before the clip driver was woken by a new video (it then claimed one "
        "at its next round, at most 0.25 s later), other work sharing the CPU: the same command read served "
        "concurrency 1 at 0.72× and 0.80× the pipeline, concurrency 4 at 1.19× and 1.20× concurrency 1, the "
        "engine's own gain 1.30× and 1.36×; with a smaller transformer (`--layers 6 --heads 6`, the VAE decode "
        "then about 60 % of an engine clip), 0.74×, 1.12× and 1.47×. The served ratio sits within this shared "
        "machine's run-to-run spread of the 0.8× goal; the batching goal is missed in every run, as the engine's "
        "own gain is below it.",
    ]
    out_md = ROOT / "docs" / "benchmarks" / "videos.md"
    lines += ["", "![clips per minute, each side](videos.png)"]
    plot(rates, args, ROOT / "docs" / "benchmarks" / "videos.png")
    out_md.write_text("\n".join(lines) + "\n")
    print(out_md.read_text())


def plot(rates: dict[str, float], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    names = [LABELS[s].replace("fewstep ", "").replace(", concurrency", ", c=") for s in SIDES]
    values = [rates[s] for s in SIDES]
    ax.barh(names[::-1], values[::-1], color=["#4c72b0", "#4c72b0", "#55a868", "#55a868", "#8c8c8c"])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("clips per minute (median of rounds)")
    ax.set_title(f"{FAMILY}, {args.frames} frames at {args.size}×{args.size}, {args.threads} CPU threads", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=6, help="clips per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frames", type=int, default=17, help="pixel frames a clip (1 + 4k)")
    p.add_argument("--size", type=int, default=64, help="frame side (a multiple of 16)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out, gap = run(args)
    write(out, gap, args)


if __name__ == "__main__":
    main()
