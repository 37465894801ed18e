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

**Hybrid** (diversity distillation, for the first chunk): a session opened with `hybrid=True` has
the first step of its first frame taken by the teacher the student was distilled from, with the
teacher's own classifier-free guidance (2 NFE), at the student schedule's first timestep; the
student re-noises that prediction and finishes the frame, and every later frame is the student's
alone. The first frame sets the stream's layout, which is where a mode-seeking student loses the
most variety; the cache is empty then, so the teacher needs no cache of its own.

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

from fewstep.engines.base import EngineInfo
from fewstep.errors import CheckpointError, InvalidRequest, Overloaded, limit_error
from fewstep.models.checkpoint import load_checkpoint, read_manifest
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
    teacher_text: TextKV | None = None
    """The prompt's keys and values in the teacher (hybrid sessions, until their first frame is made)."""
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
        teacher_folder: Path | None = None,
    ) -> None:
        """`teacher_folder`: the exact teacher the student names (hash-checked by the caller), which makes
        `hybrid` sessions possible; without it they are refused."""
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
                "hybrid": bool(teacher_folder),
            },
        )
        self.teacher_folder = teacher_folder
        self._teacher: VideoDenoiser | None = None
        self._teacher_null: TextKV | None = None
        self._teacher_guidance = 0.0
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
        states, mask = self.encoder.encode([""])
        if self.teacher_folder is not None:
            manifest, weights = load_checkpoint(self.teacher_folder)
            teacher = VideoDenoiser(VideoConfig(**manifest["architecture"]["config"]))
            try:
                teacher.load_state_dict(weights)
            except RuntimeError as e:
                raise CheckpointError(f"{self.teacher_folder.name}: weights do not fit its architecture") from e
            self._teacher = teacher.eval()
            self._teacher_guidance = float(manifest["sampler"]["guidance"])
            with torch.inference_mode():
                self._teacher_null = teacher.text_kv(states, mask)
        empty = self.net.text_kv(states, mask)
        rep = (1, self.capacity, 1, 1, 1)
        self._text = TextKV(empty.k.repeat(*rep), empty.v.repeat(*rep), empty.mask.repeat(self.capacity, 1))

    def warmup(self) -> None:
        """One frame at every step count (and a hybrid one), so the first session pays no first-call costs."""
        runs = [(steps, False) for steps in self.schedule.steps]
        if self._teacher is not None:
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
        if steps not in self.schedule.steps:
            raise limit_error("steps", f"between {min(self.schedule.steps)} and {max(self.schedule.steps)}", steps)
        if not 0 <= seed <= MAX_SEED:
            raise limit_error("seed", f"between 0 and {MAX_SEED}", seed)
        if hybrid:
            self._check_hybrid(steps)

    def _check_hybrid(self, steps: int) -> None:
        if self._teacher is None:
            raise InvalidRequest("hybrid", f"`hybrid` needs the teacher of {self.info.model!r}, which is not loaded")
        if steps < 2:
            raise limit_error("steps", "at least 2 with `hybrid` (the teacher takes the first)", steps)

    def _prompt_kv(self, prompt: str) -> TextKV:
        with torch.inference_mode():
            return self.net.text_kv(*self.encoder.encode([prompt]))

    def open(self, prompt: str, frames: int, steps: int, seed: int, hybrid: bool = False) -> VideoSession:
        """A new session in a free row; `Overloaded` when all `capacity` rows are taken."""
        if steps not in self.schedule.steps:
            raise limit_error("steps", f"between {min(self.schedule.steps)} and {max(self.schedule.steps)}", steps)
        if hybrid:
            self._check_hybrid(steps)
        text = self._prompt_kv(prompt)  # outside the lock: the text encoder is the slow part
        teacher_text = None
        if hybrid and self._teacher is not None:
            with torch.inference_mode():
                teacher_text = self._teacher.text_kv(*self.encoder.encode([prompt]))
        with self._lock:
            if not self._free:
                raise Overloaded(f"all {self.capacity} video sessions are taken (`video_max_sessions`)", 2.0)
            row = self._free.pop(0)
            self._set_text(row, text)
            self._cache.reset(row)
            session = VideoSession(
                prompt=prompt, frames=frames, steps=steps, seed=seed, row=row, hybrid=hybrid, teacher_text=teacher_text
            )
            self._sessions.add(session)
        return session

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

    # -- one step boundary ------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, sessions: list[VideoSession]) -> list[Frame]:
        """One denoising step for each open, unfinished session; the frames that finished at this step."""
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
            if not live:
                return []
            assert self._text is not None
            for s in live:
                if s.step == 0:
                    if s.pending is not None:  # a new prompt starts with a new frame
                        self._set_text(s.row, s.pending)
                        s.prompt, s.pending, s.pending_prompt = s.pending_prompt or s.prompt, None, None
                    s.x = frame_noise([s.seed], s.frame, 0, self.cfg)[0]
            rows = torch.tensor([s.row for s in live])
            text = self._text.take(rows)
            cache = self._cache.take(rows)
            ts = [self.schedule.timesteps_for(s.steps) for s in live]
            t = torch.tensor([tl[s.step] for s, tl in zip(live, ts, strict=True)])
            x = torch.stack([s.x for s in live if s.x is not None])
            v = self.net.denoise(x, t, text, cache)
            first = [i for i, s in enumerate(live) if s.teacher_text is not None and s.frame == 0 and s.step == 0]
            if first:
                v[first] = self._teacher_step(x[first], t[first], [live[i] for i in first])
            x0 = self.schedule.to_x0(v, x, t)
            done: list[int] = []
            for i, (s, tl) in enumerate(zip(live, ts, strict=True)):
                s.step += 1
                if s.step < len(tl):
                    fresh = frame_noise([s.seed], s.frame, s.step, self.cfg)
                    nxt = torch.tensor([tl[s.step]])
                    s.x = self.schedule.next_state(x0[i : i + 1], v[i : i + 1], x[i : i + 1], t[i : i + 1], nxt, fresh)[
                        0
                    ]
                else:
                    done.append(i)
            if not done:
                return []
            idx = torch.tensor(done)
            clean = x0[idx].clamp(-1, 1)
            part = cache.take(idx)  # the rows already gathered for this step
            k, vv = self.net.keys_values(clean, text.take(idx), part)
            part.store(k, vv, clean, sink=self.cfg.sink, window=self.cfg.window)
            self._cache.put(rows[idx], part)
            pixels = ((clean + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            out = []
            for j, i in enumerate(done):
                s = live[i]
                out.append(Frame(s, s.frame, pixels[j]))
                s.frame, s.step, s.x = s.frame + 1, 0, None
            return out

    def _teacher_step(self, x: torch.Tensor, t: torch.Tensor, sessions: list[VideoSession]) -> torch.Tensor:
        """The teacher's CFG velocity for the first step of these sessions' first frames (empty caches)."""
        teacher, null = self._teacher, self._teacher_null
        assert teacher is not None and null is not None
        n = len(sessions)
        texts = [s.teacher_text for s in sessions if s.teacher_text is not None]
        cond = TextKV(
            torch.cat([tt.k for tt in texts], 1),
            torch.cat([tt.v for tt in texts], 1),
            torch.cat([tt.mask for tt in texts]),
        )
        rep = (1, n, 1, 1, 1)
        uncond = TextKV(null.k.repeat(*rep), null.v.repeat(*rep), null.mask.repeat(n, 1))
        empty = KVCache.empty(teacher.cfg, n)
        v_c = teacher.denoise(x, t, cond, empty)
        v_u = teacher.denoise(x, t, uncond, empty)
        for s in sessions:
            s.teacher_text = None  # used once
        return v_u + self._teacher_guidance * (v_c - v_u)

    def health(self) -> dict[str, Any]:
        return {"loaded": self._net is not None, "sessions": self.active, "capacity": self.capacity}

    def close_all(self) -> None:
        with self._lock:
            for s in list(self._sessions):
                s.closed = True
            self._sessions.clear()
            self._free = list(range(self.capacity))
