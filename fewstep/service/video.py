"""Video streaming in the gateway: the video engines, the thread that steps their sessions, and `WS /v1/video/stream`.

A stream is stateful (its KV cache lives in one engine row), so it is served by the process that
holds its WebSocket, not through the job queue: video scales out with gateway replicas, each
admitting up to `video_max_sessions` streams per video model. Every registry model of kind
`video` is loaded (its promoted version) once the registry is seeded.

One driver thread runs every step boundary: each open session that is not finished and whose
client has read its frames (at most `video_buffer_frames` unsent) takes one step, all sessions
of one model in one batched call. Finished frames are PNG-encoded here and handed to the
session's WebSocket handler through its event loop.

The protocol (DESIGN.md §4): the client's first message is
`{"model", "prompt", "frames", "steps", "seed"}` (+ `"api_key"` when auth is on and no header
was sent). The server sends `{"type": "frame", "index", "image"}` per frame, then
`{"type": "done", "frames", …}`. `{"type": "prompt", "prompt"}` from the client steers the
frames after the one in progress. Bad input: an error message, then close 1008; over capacity
(or not loaded yet): an error message, then close 1013; a server fault closes 1011. A client
that goes away frees its session's row at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from fewstep.engines.base import EngineInfo
from fewstep.engines.image import ImageEngine
from fewstep.engines.video import Frame, VideoEngine, VideoSession
from fewstep.errors import CheckpointError, FewstepError, InvalidRequest, NotFound, NotReady, Overloaded, limit_error
from fewstep.models.checkpoint import read_manifest
from fewstep.models.registry import Registry
from fewstep.models.text import TextEncoder
from fewstep.service import errors
from fewstep.service.auth import KeyRing
from fewstep.service.metrics import Metrics
from fewstep.service.runtime import teacher_or_none
from fewstep.service.settings import Settings
from fewstep.service.worker import encode_png

log = logging.getLogger("fewstep.service")
FIRST_MESSAGE_FIELDS = ("model", "prompt", "frames", "steps", "seed", "hybrid", "api_key")


@dataclass(eq=False)
class Stream:
    """One WebSocket's session and where its frames go."""

    model: str
    session: VideoSession
    deliver: Callable[[Frame | None, str], None]
    """Gets each frame and its PNG (base64); None when the engine failed and the stream must end."""
    buffered: int = 0
    """Frames made and not yet sent by the handler."""
    last_at: float = field(default_factory=time.perf_counter)
    stalled: bool = False
    """It waited on its client since its last frame: that interval is not the engine's latency."""


class VideoStreams:
    """The video models of this process and the driver thread that steps their sessions."""

    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry) -> None:
        self.settings, self.metrics, self.registry = settings, metrics, registry
        self.engines: dict[str, VideoEngine] = {}
        self.refused: dict[str, str] = {}
        self.created: dict[str, int] = {}
        self.loaded = threading.Event()
        self._streams: set[Stream] = set()
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, seeded: threading.Event, encoder: Callable[[], TextEncoder | None]) -> None:
        """Load once the registry is seeded (`seeded`), then drive sessions until `close`."""

        def run() -> None:
            seeded.wait()
            try:
                self._load(encoder() or TextEncoder())
            finally:
                self.loaded.set()
            self._drive()

        self._thread = threading.Thread(target=run, name="video-driver", daemon=True)
        self._thread.start()

    def _load(self, encoder: TextEncoder) -> None:
        if self.settings.video_max_sessions == 0:
            return
        import torch

        torch.set_num_threads(self.settings.threads)
        for name in self.registry.models():
            try:
                version = self.registry.promoted(name)
                if version is None or self.registry.manifest(name, version).get("kind") != "video":
                    continue
                manifest = self.registry.manifest(name, version)
                engine = VideoEngine(
                    self.registry.version_dir(name, version),
                    encoder,
                    capacity=self.settings.video_max_sessions,
                    backend=self.settings.video_backend,
                    version=version,
                    first_frame=self._first_frame(manifest, encoder),
                )
                engine.load()
                engine.warmup()
            except FewstepError as e:
                self.refused[name] = str(e).replace(f"{self.registry.root}/", "")
                log.error("video model %s not served: %s", name, self.refused[name])
                continue
            self.engines[name] = engine
            self.created[name] = int(self.registry.version_dir(name, version).stat().st_mtime)
            self.metrics.video_sessions.labels(name).set(0)
            log.info("video model %s:%s ready (%d sessions)", name, version, engine.capacity)

    def _first_frame(self, manifest: dict[str, Any], encoder: TextEncoder) -> ImageEngine | None:
        """An engine on the exact image student a video manifest names for frame 0 (None when it names
        none; `CheckpointError` when the registry lacks it), with its teacher when the registry holds
        that (for `hybrid`). Always torch: one image per stream, whatever backend the frames run on."""
        folder = self.registry.named_dir(manifest, "first_frame")
        if folder is None:
            if manifest.get("first_frame") is None:
                return None
            ref = manifest["first_frame"]
            raise CheckpointError(
                f"its first-frame image model {ref.get('name')!r} (sha256 {str(ref.get('sha256'))[:12]}…) "
                "is not in the registry"
            )
        image = read_manifest(folder)
        teacher = teacher_or_none(self.registry, image["name"], image)
        return ImageEngine(folder, encoder, "torch", "fp32", version=folder.name, teacher_folder=teacher)

    def close(self) -> None:
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for engine in self.engines.values():
            engine.close_all()

    @property
    def ready(self) -> bool:
        return self.loaded.is_set()

    def infos(self) -> list[EngineInfo]:
        return [e.info for e in self.engines.values()]

    # -- sessions -------------------------------------------------------------------------------
    def engine(self, model: str) -> VideoEngine:
        if not self.loaded.is_set():
            raise NotReady("video models are still loading", 2.0)
        if model not in self.engines:
            why = f" ({self.refused[model]})" if model in self.refused else ""
            raise NotFound(f"video model {model!r} not found{why}")
        return self.engines[model]

    def open(
        self,
        model: str,
        prompt: str,
        frames: int,
        steps: int,
        seed: int,
        deliver: Callable[[Frame | None, str], None],
        hybrid: bool = False,
    ) -> Stream:
        engine = self.engine(model)
        engine.validate(frames, steps, seed, self.settings.video_max_frames, hybrid)
        try:
            session = engine.open(prompt, frames, steps, seed, hybrid)
        except Overloaded:
            self.metrics.video_rejected.labels("capacity").inc()
            raise
        stream = Stream(model, session, deliver)
        with self._cv:
            self._streams.add(stream)
            self.metrics.video_sessions.labels(model).set(engine.active)
            self._cv.notify_all()
        return stream

    def steer(self, stream: Stream, prompt: str) -> None:
        self.engines[stream.model].steer(stream.session, prompt)

    def sent(self, stream: Stream) -> None:
        """The handler sent one frame: the session may run ahead again."""
        with self._cv:
            stream.buffered -= 1
            self._cv.notify_all()

    def close_stream(self, stream: Stream) -> None:
        """Free the session's row now (the client left, or the stream ended)."""
        engine = self.engines[stream.model]
        engine.close(stream.session)
        with self._cv:
            self._streams.discard(stream)
            self.metrics.video_sessions.labels(stream.model).set(engine.active)

    # -- the driver thread ------------------------------------------------------------------------
    def _runnable(self) -> list[Stream]:
        limit = self.settings.video_buffer_frames
        out = []
        for s in self._streams:
            if s.session.closed or s.session.finished:
                continue
            if s.buffered >= limit:
                s.stalled = True
            else:
                out.append(s)
        return out

    def _drive(self) -> None:
        late_after = 1.0 / self.settings.video_target_fps
        while not self._stopping.is_set():
            with self._cv:
                self._cv.wait_for(lambda: bool(self._runnable()) or self._stopping.is_set(), timeout=1.0)
                runnable = self._runnable()
            by_model: dict[str, list[Stream]] = {}
            for s in runnable:
                by_model.setdefault(s.model, []).append(s)
            for model, streams in by_model.items():
                try:
                    frames = self.engines[model].advance([s.session for s in streams])
                except Exception:  # a broken engine must not take the process down: end these streams
                    log.exception("video engine %s failed", model)
                    for s in streams:
                        self.engines[model].close(s.session)
                        s.deliver(None, "")
                    continue
                owner = {id(s.session): s for s in streams}
                now = time.perf_counter()
                for f in frames:
                    s = owner[id(f.session)]
                    if f.index == 0:
                        self.metrics.video_ttff.labels(model).observe(now - f.session.opened_at)
                    elif not s.stalled:
                        interval = now - s.last_at
                        self.metrics.video_frame_seconds.labels(model, str(f.session.steps)).observe(interval)
                        if interval > late_after:
                            self.metrics.video_late_frames.labels(model).inc()
                    s.last_at, s.stalled = now, False
                    with self._cv:
                        s.buffered += 1
                    s.deliver(f, encode_png(f.pixels))


def _parse(raw: str) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest("message", f"the first message must be a JSON object ({e.msg})") from e
    if not isinstance(msg, dict):
        raise InvalidRequest("message", f"the first message must be a JSON object. Given: {type(msg).__name__}")
    return msg


def _check(msg: dict[str, Any], settings: Settings) -> None:
    """InvalidRequest naming the first field of the first message that is outside its limits."""
    unknown = sorted(set(msg) - set(FIRST_MESSAGE_FIELDS))
    if unknown:
        raise InvalidRequest(
            unknown[0], f"unknown field {unknown[0]!r}; the first message takes {FIRST_MESSAGE_FIELDS}"
        )
    for name in ("model", "prompt"):
        if not isinstance(msg.get(name), str) or not msg[name].strip():
            raise limit_error(name, "a non-empty string", msg.get(name))
    if len(msg["prompt"]) > settings.max_prompt_chars:
        raise limit_error(
            "prompt", f"at most {settings.max_prompt_chars} characters long", f"{len(msg['prompt'])} characters"
        )
    for name in ("frames", "steps", "seed"):
        value = msg.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise limit_error(name, "an integer", value)
    if not isinstance(msg.get("hybrid", False), bool):
        raise limit_error("hybrid", "true or false", msg["hybrid"])
    if msg.get("frames") is None:
        raise limit_error("frames", f"an integer between 1 and {settings.video_max_frames}", None)


def install(app: FastAPI, settings: Settings, streams: VideoStreams, keys: KeyRing, metrics: Metrics) -> None:
    """Add `WS /v1/video/stream` to `app`."""

    async def fail(ws: WebSocket, e: FewstepError, reason: str | None) -> None:
        """Send the error, then close with its code; count a refused session under `reason`."""
        if reason is not None:
            metrics.video_rejected.labels(reason).inc()
        await ws.send_json({"type": "error", "message": str(e), "code": type(e).__name__})
        await ws.close(code=errors.ws_close_code(e))

    @app.websocket("/v1/video/stream")
    async def video_stream(ws: WebSocket) -> None:
        await ws.accept()
        loop = asyncio.get_running_loop()
        try:
            raw = await asyncio.wait_for(ws.receive_text(), settings.video_first_message_s)
        except TimeoutError:
            await fail(
                ws,
                InvalidRequest(
                    "message", f"no first message within `video_first_message_s` = {settings.video_first_message_s} s"
                ),
                "invalid",
            )
            return
        except WebSocketDisconnect:
            return  # gone before asking for anything
        except KeyError:  # Starlette's sign of a binary message
            await fail(ws, InvalidRequest("message", "the first message must be JSON text, not binary"), "invalid")
            return
        try:
            msg = _parse(raw)
            header = ws.headers.get("authorization")
            keys.principal(header if header else (f"Bearer {msg['api_key']}" if msg.get("api_key") else None))
            _check(msg, settings)
            engine = streams.engine(msg["model"])
            steps = msg["steps"] if msg.get("steps") is not None else engine.info.default_steps
            seed = msg["seed"] if msg.get("seed") is not None else secrets.randbelow(1 << 31)
        except FewstepError as e:
            await fail(ws, e, "invalid" if errors.ws_close_code(e) == errors.WS_POLICY_VIOLATION else "unavailable")
            return
        queue: asyncio.Queue[tuple[Frame | None, str]] = asyncio.Queue()

        def deliver(frame: Frame | None, png: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (frame, png))

        t0 = time.perf_counter()
        try:
            stream = await asyncio.to_thread(
                streams.open, msg["model"], msg["prompt"], msg["frames"], steps, seed, deliver, msg.get("hybrid", False)
            )
        except FewstepError as e:
            await fail(ws, e, None if isinstance(e, Overloaded) else "invalid")  # capacity: counted by `open`
            return
        listener = asyncio.create_task(_listen(ws, streams, stream, settings))
        sent = 0
        try:
            while sent < stream.session.frames:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    bad = listener.exception()
                    if isinstance(bad, FewstepError):
                        await fail(ws, bad, None)
                    return  # the client left (or broke the protocol): `finally` frees the row
                frame, png = getter.result()
                if frame is None:
                    await ws.close(code=errors.WS_INTERNAL_ERROR)
                    return
                await ws.send_json({"type": "frame", "index": frame.index, "image": png})
                streams.sent(stream)
                metrics.video_frames.labels(stream.model).inc()
                sent += 1
            elapsed = time.perf_counter() - t0
            await ws.send_json(
                {
                    "type": "done",
                    "frames": sent,
                    "model": stream.model,
                    "model_version": engine.info.version,
                    "steps": steps,
                    "seed": seed,
                    "hybrid": stream.session.hybrid,
                    "prompt": stream.session.prompt,
                    "seconds": round(elapsed, 3),
                    "fps": round(sent / elapsed, 2) if elapsed > 0 else None,
                }
            )
            await ws.close()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left mid-send
        finally:
            listener.cancel()
            streams.close_stream(stream)


async def _listen(ws: WebSocket, streams: VideoStreams, stream: Stream, settings: Settings) -> None:
    """Client messages during a stream: prompt changes; returns when the client leaves, raises on bad input."""
    while True:
        try:
            raw = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return
        except KeyError as e:  # a binary message
            raise InvalidRequest("message", "messages must be JSON text") from e
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidRequest("message", f"messages must be JSON objects ({e.msg})") from e
        if not isinstance(msg, dict) or msg.get("type") != "prompt":
            raise InvalidRequest(
                "type", f"a message mid-stream must be {{'type': 'prompt', 'prompt': …}}. Given: {raw[:100]!r}"
            )
        prompt = msg.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise limit_error("prompt", "a non-empty string", prompt)
        if len(prompt) > settings.max_prompt_chars:
            raise limit_error(
                "prompt", f"at most {settings.max_prompt_chars} characters long", f"{len(prompt)} characters"
            )
        await asyncio.to_thread(streams.steer, stream, prompt)
