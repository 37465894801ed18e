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
into the session's cache and sends it as frame 0. The video student only ever continues a stream
(why: docs/decisions/video-quality.md). A student whose manifest names no image model draws frame 0
itself, from noise, like every later frame.

**Hybrid** (diversity distillation, for the first chunk): a session opened with `hybrid` asks the
image engine for its hybrid first frame: the image teacher takes the first interval with its own
classifier-free guidance, the image student the rest, handed off as the image student's manifest says
(`models.sampling.Handoff`). The first frame sets the stream's layout (where
the shape is, the background), which is where a mode-seeking student loses the most variety; every
later frame is the video student's. Without an image model with its teacher loaded, `hybrid` is
refused.

Every noise draw is a function of (seed, frame, step) (`models.sampling.frame_noise`), and every
step applies the schedule's one update rule, so a stream's frames are the same whatever other
sessions share its batches, and equal to the trainer's reference sampler (`student_stream`).

Thread-safety: `open`, `steer` and `end` may be called from any thread (the WebSocket handlers);
`advance` from one driver thread. One lock orders them.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.engines.backends import backend
from fewstep.engines.base import Frame, ImageItem, Session, StreamRequest, run_to_completion, stream_alone
from fewstep.engines.image import ImageEngine
from fewstep.engines.specs import VideoSpec
from fewstep.errors import CheckpointError, FewstepError, GenerationFailed, Overloaded
from fewstep.models.checkpoint import WEIGHTS, read_manifest
from fewstep.models.sampling import frame_from_image, frame_noise, to_pixels
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video_cache import KVCache, TextKV, VideoConfig, VideoNet

VIDEO_BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass(eq=False)
class _Row:
    """The engine's state of one session: its cache row and the frame in progress."""

    row: int
    step: int = 0
    x: torch.Tensor | None = None
    pending: TextKV | None = None
    """A new prompt's keys and values, taken at the next frame boundary."""
    pending_prompt: str | None = None
    first: torch.Tensor | None = None
    """Frame 0 (C, H, W) in [-1, 1], drawn by the image model at `open`, until it is sent."""


class VideoEngine:
    """Serves one video student version to up to `capacity` concurrent sessions (a `StreamEngine`)."""

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
            raise CheckpointError(f"the video backend must be one of {VIDEO_BACKENDS}. Given: {backend!r}")
        manifest = read_manifest(folder)
        if manifest.get("kind") != "video":
            raise CheckpointError(f"{folder.name}: kind {manifest.get('kind')!r} is not a video student")
        self._spec = VideoSpec.from_manifest(manifest, version or str(manifest.get("version", "1")), backend, capacity)
        try:
            self.cfg = VideoConfig(**manifest["architecture"]["config"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{folder.name}: manifest has no valid architecture ({e})") from e
        self.schedule = FewStepSchedule.from_dict(manifest["schedule"])
        self.folder, self.encoder, self.backend, self.manifest = folder, encoder, backend, manifest
        ref = manifest.get("first_frame")
        if first_frame is None:
            if ref is not None:
                raise CheckpointError(f"{folder.name}: its first-frame image model {ref.get('name')!r} is missing")
        elif ref is None:
            raise ValueError(f"{folder.name} names no first-frame model; do not pass one")
        elif first_frame.manifest.get("files", {}).get(WEIGHTS, {}).get("sha256") != ref.get("sha256"):
            raise CheckpointError(f"{folder.name}: the first-frame model given is not the one its manifest names")
        self.first_frame = first_frame
        self._net: VideoNet | None = None
        self._lock = threading.Lock()
        self._free = list(range(capacity))
        self._sessions: set[Session] = set()
        self._cache = KVCache.empty(self.cfg, capacity)
        self._text: TextKV | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def spec(self) -> VideoSpec:
        """The stream's hybrid is the first-frame model's (known once that is loaded)."""
        ff = self.first_frame
        if ff is None:
            return self._spec
        return dataclasses.replace(self._spec, hybrid=ff.spec.hybrid, hybrid_reason=ff.spec.hybrid_reason)

    @property
    def capacity(self) -> int:
        return self._spec.capacity

    def load(self) -> None:
        """Verify the weights (hashes, no pickles, strict shapes) and build the network on the backend."""
        self._net = backend(self.backend).video(self.folder, self.manifest, self.cfg)
        if self.first_frame is not None:
            self.first_frame.load()
            if self.first_frame.spec.height % self.cfg.size:
                raise CheckpointError(f"{self.folder.name}: the first-frame model's images do not reduce to its size")
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
        if self.spec.hybrid:
            runs.append((max(self.schedule.steps), True))
        for steps, hybrid in runs:
            stream_alone(self, StreamRequest("warm-up", 1, steps, 0, hybrid))

    def close(self) -> None:
        """End every session and drop the network."""
        with self._lock:
            for s in list(self._sessions):
                s.closed = True
            self._sessions.clear()
            self._free = list(range(self.capacity))
        self._net = None
        if self.first_frame is not None:
            self.first_frame.close()

    @property
    def net(self) -> VideoNet:
        if self._net is None:
            raise RuntimeError("engine not loaded")
        return self._net

    @property
    def active(self) -> int:
        return len(self._sessions)

    # -- sessions ---------------------------------------------------------------------------------
    def _first(self, request: StreamRequest) -> torch.Tensor | None:
        """Frame 0 from the image model, averaged down to the video size: (C, H, W) in [-1, 1]."""
        if self.first_frame is None:
            return None
        item = ImageItem(request.prompt, seed=request.seed, steps=request.steps, hybrid=request.hybrid)
        (result,) = run_to_completion(self.first_frame, [item])
        if isinstance(result, FewstepError):
            raise result
        return frame_from_image(result.pixels, self.cfg.size)

    def _prompt_kv(self, prompt: str) -> TextKV:
        with torch.inference_mode():
            return self.net.text_kv(*self.encoder.encode([prompt]))

    def open(self, request: StreamRequest) -> Session:
        """A new session in a free row; `Overloaded` when all `capacity` rows are taken. The request's steps,
        seed and hybrid are checked (`InvalidRequest`); its frame count is the caller's limit to set."""
        self.spec.check(request)
        if not self._free:  # refuse before the slow part; the check under the lock below is the one that counts
            raise self._full()
        # Outside the lock: the text encoder and the image model are the slow part.
        text = self._prompt_kv(request.prompt)
        first = self._first(request)
        with self._lock:
            if not self._free:
                raise self._full()
            row = self._free.pop(0)
            self._set_text(row, text)
            self._cache.reset(row)
            session = Session(request, request.prompt, state=_Row(row, first=first))
            self._sessions.add(session)
        return session

    def _full(self) -> Overloaded:
        return Overloaded(f"all {self.capacity} video sessions are taken (`video_max_sessions`)", 2.0)

    def steer(self, session: Session, prompt: str) -> None:
        """Change the prompt from the session's next frame on (the frame in progress keeps its own)."""
        text = self._prompt_kv(prompt)
        with self._lock:
            session.state.pending, session.state.pending_prompt = text, prompt

    def end(self, session: Session) -> None:
        """Free the session's row now; a later `advance` skips it."""
        with self._lock:
            self._release(session)

    def _release(self, session: Session) -> None:
        """Close `session` and free its row (under the lock; once)."""
        if session.closed:
            return
        session.closed = True
        self._sessions.discard(session)
        self._free.append(session.state.row)
        self._free.sort()

    def _set_text(self, row: int, text: TextKV) -> None:
        assert self._text is not None
        self._text.k[:, row] = text.k[:, 0]
        self._text.v[:, row] = text.v[:, 0]
        self._text.mask[row] = text.mask[0]
        self._text.pooled[row] = text.pooled[0]

    # -- one step boundary ------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, sessions: list[Session]) -> list[Frame]:
        """One denoising step for each open, unfinished session; the frames that finished at this step.
        A session whose frame 0 came from the image model finishes it at its first boundary, in the same
        cache write as the others. A session whose finished frame is not finite fails alone (`Session.error`,
        ended) and writes nothing into the cache."""
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
            if not live:
                return []
            assert self._text is not None
            for s in live:
                st: _Row = s.state
                if st.step == 0 and st.pending is not None:  # a new prompt starts with a new frame
                    self._set_text(st.row, st.pending)
                    s.prompt, st.pending, st.pending_prompt = st.pending_prompt or s.prompt, None, None
            done = [s for s in live if s.state.first is not None]
            clean = [s.state.first for s in done]
            stepping = [s for s in live if s.state.first is None]
            if stepping:
                finished, frames = self._step(stepping)
                done, clean = done + finished, clean + frames
            finite = [bool(torch.isfinite(x).all()) for x in clean]
            for s, ok in zip(done, finite, strict=True):
                if not ok:  # fails alone: its row is its own, so the others' frames are untouched
                    s.error = GenerationFailed("generation failed: a frame is not finite")
                    self._release(s)
            done = [s for s, ok in zip(done, finite, strict=True) if ok]
            clean = [x for x, ok in zip(clean, finite, strict=True) if ok]
            if not done:
                return []
            rows = torch.tensor([s.state.row for s in done])
            x0 = torch.stack(clean)
            part = self._cache.take(rows)
            k, v = self.net.keys_values(x0, self._text.take(rows), part)
            part.store(k, v, x0, sink=self.cfg.sink, window=self.cfg.window)
            self._cache.put(rows, part)
            out = []
            for s, p in zip(done, to_pixels(x0), strict=True):
                out.append(Frame(s, s.frame, p))
                s.frame += 1
                s.state.step, s.state.x, s.state.first = 0, None, None
            return out

    def _step(self, live: list[Session]) -> tuple[list[Session], list[torch.Tensor]]:
        """One batched student step of `live`'s current frames: the sessions whose frame that step
        finished, and those frames (C, H, W), clean."""
        assert self._text is not None
        rows: list[_Row] = [s.state for s in live]
        for s, st in zip(live, rows, strict=True):
            if st.step == 0:
                st.x = frame_noise([s.request.seed], s.frame, 0, self.cfg)[0]
        ts = [self.schedule.timesteps_for(s.request.steps) for s in live]
        t = torch.tensor([tl[st.step] for st, tl in zip(rows, ts, strict=True)])
        x = torch.stack([st.x for st in rows if st.x is not None])
        where = torch.tensor([st.row for st in rows])
        v = self.net.denoise(x, t, self._text.take(where), self._cache.take(where))
        t_next = [tl[st.step + 1] if st.step + 1 < len(tl) else None for st, tl in zip(rows, ts, strict=True)]

        def noise(i: int) -> torch.Tensor:
            return frame_noise([live[i].request.seed], live[i].frame, rows[i].step + 1, self.cfg)[0]

        x0, nxt = self.schedule.step(x, t, v, t_next, noise)
        done, clean = [], []
        for i, (s, st) in enumerate(zip(live, rows, strict=True)):
            st.step += 1
            if (state := nxt[i]) is not None:
                st.x = state
            else:
                done.append(s)
                clean.append(x0[i].clamp(-1, 1))
        return done, clean
