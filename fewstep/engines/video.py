"""The streaming video engine: many sessions, one preallocated KV cache, batched at step boundaries.

A session is one stream: a prompt, a frame count, 1–4 student steps per frame and a seed. It
owns one row of the engine's cache (`capacity` rows, allocated at load, never resized), so the
memory and the per-frame cost of a stream are the same at frame 10 and at frame 10 000: the
cache holds an attention sink and a rolling window of frames, whatever the stream's length.

`advance(sessions)` is one step boundary. Every session given takes one denoising step of its
current frame, each at its own timestep (sessions may run different step counts and be at
different frames), in one batched network call on the rows they own. Sessions that finished
their frame then get one more batched call on their clean frames, whose keys and values go
into their rows. The prompt's keys and values are computed once per prompt (`open`, `steer`).

**The first frame** comes from an image model when the student's manifest names one
(`first_frame`: image to video). At `open` the image engine draws the prompt at the session's seed
and step count; the engine averages it down to the video size, and the first step boundary writes it
into the session's cache and sends it as frame 0. The video student only ever continues a stream.
Why: at 16×16 no network learned to draw the shapes from scratch in this project's CPU budget, while
the image student draws them at 32×32 in one step (`docs/experiments/video_quality`). A student
whose manifest names no image model draws frame 0 itself, from noise, like every later frame.

**Hybrid** (diversity distillation, for the first chunk): a session opened with `hybrid=True` asks
the image engine for its hybrid first frame: the image teacher takes its first step with its own
classifier-free guidance, the image student the rest. The first frame sets the stream's layout (where
the shape is, the background), which is where a mode-seeking student loses the most variety; every
later frame is the video student's. Without an image model with its teacher loaded, `hybrid` is
refused.

Every noise draw is a function of (seed, frame, step) (`models.video.frame_noise`), so a
stream's frames are the same whatever other sessions share its batches, and equal to the
trainer's reference sampler (`models.video.student_stream`).

Thread-safety: `open`, `steer` and `close` may be called from any thread (the WebSocket
handlers); `advance` from one driver thread. One lock orders them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.engines.base import EngineInfo, ImageItem
from fewstep.engines.image import ImageEngine
from fewstep.errors import CheckpointError, FewstepError, InvalidRequest, Overloaded, limit_error
from fewstep.models.checkpoint import WEIGHTS, load_checkpoint, read_manifest
from fewstep.models.schedules import MAX_SEED, FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import (
    KVCache,
    TextKV,
    VideoConfig,
    VideoDenoiser,
    VideoNet,
    frame_noise,
)

VIDEO_BACKENDS = ("torch", "onnxruntime")


@dataclass(eq=False)
class VideoSession:
    """One stream's state. `frame` is the index of the frame being made, `step` its next step."""

    prompt: str
    frames: int
    steps: int
    seed: int
    row: int
    frame: int = 0
    step: int = 0
    x: torch.Tensor | None = None
    pending: TextKV | None = None
    """A new prompt's keys and values, taken at the next frame boundary."""
    pending_prompt: str | None = None
    hybrid: bool = False
    first: torch.Tensor | None = None
    """Frame 0 (C, H, W) in [-1, 1], drawn by the image model at `open`, until it is sent."""
    closed: bool = False
    opened_at: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return self.frame >= self.frames


@dataclass(frozen=True)
class Frame:
    """A finished frame of a session: (H, W, 3) uint8 pixels."""

    session: VideoSession
    index: int
    pixels: np.ndarray


class VideoEngine:
    """Serves one video student version to up to `capacity` concurrent sessions."""

    def __init__(
        self,
        folder: Path,
        encoder: TextEncoder,
        capacity: int,
        backend: str = "torch",
        version: str | None = None,
        first_frame: ImageEngine | None = None,
    ) -> None:
        """`first_frame`: an engine (not yet loaded) on the exact image student the manifest names under
        `first_frame` (hash-checked by the caller); required when the manifest names one. `hybrid`
        sessions need its teacher."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1. Given: {capacity}")
        if backend not in VIDEO_BACKENDS:
            raise InvalidRequest("backend", f"`backend` for video must be one of {VIDEO_BACKENDS}. Given: {backend!r}")
        manifest = read_manifest(folder)
        if manifest.get("kind") != "video":
            raise CheckpointError(f"{folder.name}: kind {manifest.get('kind')!r} is not a video student")
        try:
            self.schedule = FewStepSchedule.from_dict(manifest["schedule"])
            self.cfg = VideoConfig(**manifest["architecture"]["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{folder.name}: manifest has no valid schedule or architecture ({e})") from e
        self.folder, self.encoder, self.capacity, self.backend = folder, encoder, capacity, backend
        self.manifest = manifest
        ref = manifest.get("first_frame")
        if ref is not None and not isinstance(ref, dict):
            raise CheckpointError(f"{folder.name}: manifest's `first_frame` is not a model reference")
        if first_frame is None:
            if ref is not None:
                raise CheckpointError(f"{folder.name}: its first-frame image model {ref.get('name')!r} is missing")
        elif ref is None:
            raise ValueError(f"{folder.name} names no first-frame model; do not pass one")
        elif first_frame.manifest.get("files", {}).get(WEIGHTS, {}).get("sha256") != ref.get("sha256"):
            raise CheckpointError(f"{folder.name}: the first-frame model given is not the one its manifest names")
        elif first_frame.shape[0] != self.cfg.channels:
            raise CheckpointError(f"{folder.name}: the first-frame model's channels differ from the student's")
        self.info = EngineInfo(
            model=manifest["name"],
            version=version or str(manifest.get("version", "1")),
            kind="video",
            steps=self.schedule.steps,
            default_steps=self.schedule.default_steps,
            size=manifest["native_size"],
            backend=backend,
            precision="fp32",
            extra={
                "sink": self.cfg.sink,
                "window": self.cfg.window,
                "capacity": capacity,
                "hybrid": bool(first_frame and first_frame.hybrid_available),
                "first_frame": first_frame.info.model if first_frame else None,
            },
        )
        self.first_frame = first_frame
        self._net: VideoNet | None = None
        self._lock = threading.Lock()
        self._free = list(range(capacity))
        self._sessions: set[VideoSession] = set()
        self._cache = KVCache.empty(self.cfg, capacity)
        self._text: TextKV | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        """Verify the weights (hashes, no pickles, strict shapes) and build the network on the backend."""
        if self.backend == "onnxruntime":
            from fewstep.exporters.video_onnx import load_video_graphs

            self._net = load_video_graphs(self.folder, self.cfg)
        else:
            _, state = load_checkpoint(self.folder)
            net = VideoDenoiser(self.cfg)
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(f"{self.folder.name}: weights do not fit the manifest's architecture") from e
            self._net = net.eval()
        if self.first_frame is not None:
            self.first_frame.load()
            self.info.extra["hybrid"] = self.first_frame.hybrid_available
        states, mask = self.encoder.encode([""])
        with torch.inference_mode():
            empty = self.net.text_kv(states, mask)
        rep = (1, self.capacity, 1, 1, 1)
        self._text = TextKV(
            empty.k.repeat(*rep),
            empty.v.repeat(*rep),
            empty.mask.repeat(self.capacity, 1),
            empty.pooled.repeat(self.capacity, 1),
        )

    def warmup(self) -> None:
        """One frame at every step count (and a hybrid one), so the first session pays no first-call costs."""
        runs = [(steps, False) for steps in self.schedule.steps]
        if self.info.extra["hybrid"]:
            runs.append((max(self.schedule.steps), True))
        for steps, hybrid in runs:
            s = self.open("warm-up", 1, steps, 0, hybrid=hybrid)
            try:
                while not s.finished:
                    self.advance([s])
            finally:
                self.close(s)

    @property
    def net(self) -> VideoNet:
        if self._net is None:
            raise RuntimeError("engine not loaded")
        return self._net

    @property
    def active(self) -> int:
        return len(self._sessions)

    # -- sessions ---------------------------------------------------------------------------------
    def validate(self, frames: int, steps: int, seed: int, max_frames: int, hybrid: bool = False) -> None:
        if not 1 <= frames <= max_frames:
            raise limit_error("frames", f"between 1 and {max_frames}", frames)
        self._check(steps, seed, hybrid)

    def _check(self, steps: int, seed: int, hybrid: bool) -> None:
        if steps not in self.schedule.steps:
            raise limit_error("steps", f"between {min(self.schedule.steps)} and {max(self.schedule.steps)}", steps)
        if not 0 <= seed <= MAX_SEED:
            raise limit_error("seed", f"between 0 and {MAX_SEED}", seed)
        if hybrid:
            self._check_hybrid(steps)

    def _check_hybrid(self, steps: int) -> None:
        if not self.info.extra["hybrid"]:
            raise InvalidRequest(
                "hybrid", f"`hybrid` needs the image teacher of {self.info.model!r}'s first frame, which is not loaded"
            )
        if steps < 2:
            raise limit_error("steps", "at least 2 with `hybrid` (the teacher takes the first)", steps)

    def _first(self, prompt: str, steps: int, seed: int, hybrid: bool) -> torch.Tensor | None:
        """Frame 0 from the image model, averaged down to the video size: (C, H, W) in [-1, 1]."""
        if self.first_frame is None:
            return None
        (result,) = self.first_frame.run([ImageItem(prompt, seed=seed, steps=steps, hybrid=hybrid)])
        if isinstance(result, FewstepError):
            raise result
        return first_frame_from_pixels(result.pixels, self.cfg.size)

    def _prompt_kv(self, prompt: str) -> TextKV:
        with torch.inference_mode():
            return self.net.text_kv(*self.encoder.encode([prompt]))

    def open(self, prompt: str, frames: int, steps: int, seed: int, hybrid: bool = False) -> VideoSession:
        """A new session in a free row; `Overloaded` when all `capacity` rows are taken."""
        self._check(steps, seed, hybrid)
        if not self._free:  # refuse before the slow part; the check under the lock below is the one that counts
            raise self._full()
        # Outside the lock: the text encoder and the image model are the slow part.
        text = self._prompt_kv(prompt)
        first = self._first(prompt, steps, seed, hybrid)
        with self._lock:
            if not self._free:
                raise self._full()
            row = self._free.pop(0)
            self._set_text(row, text)
            self._cache.reset(row)
            session = VideoSession(
                prompt=prompt, frames=frames, steps=steps, seed=seed, row=row, hybrid=hybrid, first=first
            )
            self._sessions.add(session)
        return session

    def _full(self) -> Overloaded:
        return Overloaded(f"all {self.capacity} video sessions are taken (`video_max_sessions`)", 2.0)

    def steer(self, session: VideoSession, prompt: str) -> None:
        """Change the prompt from the session's next frame on (the frame in progress keeps its own)."""
        text = self._prompt_kv(prompt)
        with self._lock:
            session.pending, session.pending_prompt = text, prompt

    def close(self, session: VideoSession) -> None:
        """Free the session's row now; a later `advance` skips it."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
            self._sessions.discard(session)
            self._free.append(session.row)
            self._free.sort()

    def _set_text(self, row: int, text: TextKV) -> None:
        assert self._text is not None
        self._text.k[:, row] = text.k[:, 0]
        self._text.v[:, row] = text.v[:, 0]
        self._text.mask[row] = text.mask[0]
        self._text.pooled[row] = text.pooled[0]

    # -- one step boundary ------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, sessions: list[VideoSession]) -> list[Frame]:
        """One denoising step for each open, unfinished session; the frames that finished at this step.
        A session whose frame 0 came from the image model finishes it at its first boundary, in the same
        cache write as the others."""
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
            if not live:
                return []
            assert self._text is not None
            for s in live:
                if s.step == 0 and s.pending is not None:  # a new prompt starts with a new frame
                    self._set_text(s.row, s.pending)
                    s.prompt, s.pending, s.pending_prompt = s.pending_prompt or s.prompt, None, None
            done = [s for s in live if s.first is not None]
            clean = [s.first for s in done if s.first is not None]
            stepping = [s for s in live if s.first is None]
            if stepping:
                finished, frames = self._step(stepping)
                done, clean = done + finished, clean + frames
            if not done:
                return []
            rows = torch.tensor([s.row for s in done])
            x0 = torch.stack(clean)
            part = self._cache.take(rows)
            k, v = self.net.keys_values(x0, self._text.take(rows), part)
            part.store(k, v, x0, sink=self.cfg.sink, window=self.cfg.window)
            self._cache.put(rows, part)
            pixels = ((x0 + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            out = []
            for s, p in zip(done, pixels, strict=True):
                out.append(Frame(s, s.frame, p))
                s.frame, s.step, s.x, s.first = s.frame + 1, 0, None, None
            return out

    def _step(self, live: list[VideoSession]) -> tuple[list[VideoSession], list[torch.Tensor]]:
        """One batched student step of `live`'s current frames: the sessions whose frame that step
        finished, and those frames (C, H, W), clean."""
        assert self._text is not None
        for s in live:
            if s.step == 0:
                s.x = frame_noise([s.seed], s.frame, 0, self.cfg)[0]
        rows = torch.tensor([s.row for s in live])
        ts = [self.schedule.timesteps_for(s.steps) for s in live]
        t = torch.tensor([tl[s.step] for s, tl in zip(live, ts, strict=True)])
        x = torch.stack([s.x for s in live if s.x is not None])
        v = self.net.denoise(x, t, self._text.take(rows), self._cache.take(rows))
        x0 = self.schedule.to_x0(v, x, t)
        done, clean = [], []
        for i, (s, tl) in enumerate(zip(live, ts, strict=True)):
            s.step += 1
            if s.step < len(tl):
                fresh = frame_noise([s.seed], s.frame, s.step, self.cfg)
                nxt = torch.tensor([tl[s.step]])
                s.x = self.schedule.next_state(x0[i : i + 1], v[i : i + 1], x[i : i + 1], t[i : i + 1], nxt, fresh)[0]
            else:
                done.append(s)
                clean.append(x0[i].clamp(-1, 1))
        return done, clean

    def health(self) -> dict[str, Any]:
        return {"loaded": self._net is not None, "sessions": self.active, "capacity": self.capacity}

    def close_all(self) -> None:
        with self._lock:
            for s in list(self._sessions):
                s.closed = True
            self._sessions.clear()
            self._free = list(range(self.capacity))


def first_frame_from_pixels(pixels: np.ndarray, size: int) -> torch.Tensor:
    """An image engine's (H, W, 3) uint8 picture as a video frame (3, size, size) in [-1, 1]: each
    size × size block of the picture averaged, as the video data set makes its frames."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
    factor = x.shape[-1] // size
    if factor * size != x.shape[-1]:
        raise CheckpointError(f"the first-frame model's {x.shape[-1]}-pixel images do not reduce to {size}")
    return torch.nn.functional.avg_pool2d(x[None], factor)[0] if factor > 1 else x
