"""Video streaming in the gateway: the video engines, the thread that steps their sessions, and `WS /v1/video/stream`.

A stream is stateful (its KV cache lives in one engine row), so it is served by the process that
holds its WebSocket, not through the job queue: video scales out with gateway replicas, each
admitting up to `video_max_sessions` streams per video model. Every registry model of kind
`video` is loaded (its promoted version) once the registry is seeded.

Video models follow the registry like image models do: every `watch_interval_s` a watch thread
reads each model's pointer, and a new version (a push, a promotion, a rollback) is loaded beside
the one serving. Once it has loaded, warmed up and passed the video gate (`service/video_gate.py`:
fixed probe streams, judged against the version serving), new sessions open on it; the sessions
open on the old version finish there, and the old engine is dropped when its last session ends.
A version that fails to load (bad weights, a first-frame model the registry lacks) or fails the
gate is refused with its reason (`GET /v1/models` lists it), logged, and not tried again until the
pointer moves; the version serving goes on serving.

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
from fewstep.service.gate import Verdict
from fewstep.service.metrics import Metrics
from fewstep.service.runtime import teacher_or_none
from fewstep.service.settings import Settings
from fewstep.service.video_gate import VideoGate
from fewstep.service.worker import encode_png

log = logging.getLogger("fewstep.service")
FIRST_MESSAGE_FIELDS = ("model", "prompt", "frames", "steps", "seed", "hybrid", "api_key")


@dataclass(eq=False)
class Stream:
    """One WebSocket's session and where its frames go."""

    model: str
    engine: VideoEngine
    """The engine (model version) the session lives on: it finishes there, even after a newer version
    of the model took over new sessions."""
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
        """The engine new sessions of each model open on: its promoted version."""
        self.refused: dict[str, str] = {}
        """Why a model's promoted version is not served (while an older version may still be)."""
        self.created: dict[str, int] = {}
        self.statuses: dict[str, dict[str, tuple[str, str | None]]] = {}
        """Per model, the versions this process knows: "serving", "draining" (finishing its sessions after a
        newer version took over) or "refused" (with the reason), for `GET /v1/models`."""
        self.loaded = threading.Event()
        self._encoder: TextEncoder | None = None
        self._tried: dict[str, str] = {}
        """The version each model's pointer was at when last followed: not loaded again until it moves."""
        self._retired: list[VideoEngine] = []
        """Older versions still finishing their sessions."""
        self._opening: dict[int, int] = {}
        """Sessions being opened per engine (by id): a retired engine is not dropped under them."""
        self._follow = threading.Lock()
        self._gate = VideoGate(registry, settings)
        self._scores: dict[str, dict[str, float] | None] = {}
        """The gate's scores of each model's serving version: what a newer version is judged against."""
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
            if self.settings.video_max_sessions:
                threading.Thread(target=self._watch, name="video-watch", daemon=True).start()
            self._drive()

        self._thread = threading.Thread(target=run, name="video-driver", daemon=True)
        self._thread.start()

    def _load(self, encoder: TextEncoder) -> None:
        if self.settings.video_max_sessions == 0:
            return
        import torch

        torch.set_num_threads(self.settings.threads)
        self._encoder = encoder
        self.maintain()

    def _watch(self) -> None:
        """Follow the registry every `watch_interval_s` until `close`."""
        while not self._stopping.wait(self.settings.watch_interval_s):
            try:
                self.maintain()
            except Exception:  # the watch must outlive any one bad version or registry hiccup
                log.exception("video registry watch failed; retrying in %.0f s", self.settings.watch_interval_s)

    def maintain(self) -> None:
        """Serve every video model's promoted version, and drop retired versions that have no sessions left."""
        for name in self.registry.models():
            self.follow(name)
        with self._cv:
            drained = [e for e in self._retired if e.active == 0 and not self._opening.get(id(e))]
            self._retired = [e for e in self._retired if e not in drained]
            for e in drained:
                status = self.statuses.get(e.info.model, {})
                if status.get(e.info.version, ("",))[0] == "draining":
                    del status[e.info.version]
        for engine in drained:
            engine.close_all()
            log.info("video model %s:%s retired", engine.info.model, engine.info.version)

    def follow(self, name: str) -> None:
        """Load `name`'s promoted version if it is a video model not yet served (or tried), and open new
        sessions on it; on failure record why and keep serving the version that was."""
        assert self._encoder is not None, "follow() before _load()"
        with self._follow:
            version: str | None = None
            current = self.engines.get(name)
            try:
                version = self.registry.promoted(name)
                if version is None or self._tried.get(name) == version:
                    return
                if current is not None and current.info.version == version:
                    self._tried[name] = version
                    return
                self._tried[name] = version
                manifest = self.registry.manifest(name, version)
                if manifest.get("kind") != "video":
                    return
                engine = VideoEngine(
                    self.registry.version_dir(name, version),
                    self._encoder,
                    capacity=self.settings.video_max_sessions,
                    backend=self.settings.video_backend,
                    version=version,
                    first_frame=self._first_frame(manifest, self._encoder),
                )
                engine.load()
                engine.warmup()
                verdict = self._gate_check(name, version, engine, current)
                if not verdict.passed:
                    engine.close_all()
                    raise CheckpointError(f"refused by the video gate: {verdict.reason}")
            except Exception as e:  # whatever a bad version does, the version serving goes on
                if not isinstance(e, FewstepError):
                    log.exception("loading video model %s:%s failed", name, version)
                why = str(e) if isinstance(e, FewstepError) else f"it failed to load ({type(e).__name__})"
                reason = why.replace(f"{self.registry.root}/", "")
                if version is not None:
                    self.statuses.setdefault(name, {})[version] = ("refused", reason)
                self.refused[name] = f"version {version}: {reason}" if current is not None else reason
                if current is not None:
                    log.error(
                        "video model %s:%s not served (%s:%s serves on): %s",
                        name,
                        version,
                        name,
                        current.info.version,
                        reason,
                    )
                else:
                    log.error("video model %s not served: %s", name, reason)
                return
            with self._cv:
                old = self.engines.get(name)
                self.engines[name] = engine
                status = self.statuses.setdefault(name, {})
                if old is not None:
                    self._retired.append(old)
                    status[old.info.version] = ("draining", None)
                status[version] = ("serving", None)
                scores: dict[str, float] = {
                    k: verdict.metrics[k] for k in ("joint_accuracy", "motion_accuracy") if k in verdict.metrics
                }
                self._scores[name] = scores or None
                self.refused.pop(name, None)
                self.created[name] = int(self.registry.version_dir(name, version).stat().st_mtime)
                self.metrics.video_sessions.labels(name).set(self._active(name))
        if old is None:
            log.info("video model %s:%s ready (%d sessions)", name, version, engine.capacity)
        else:
            log.info(
                "video model %s:%s serves new sessions; %s finishes %d", name, version, old.info.version, old.active
            )

    def _gate_check(self, name: str, version: str, engine: VideoEngine, current: VideoEngine | None) -> Verdict:
        """The video gate's verdict on a loaded engine (recorded in the registry); passes when the gate is off."""
        if self.settings.video_gate_streams == 0:
            return Verdict(True, None, {})
        against = current.info.version if current is not None else None
        verdict = self._gate.check(engine, self._scores.get(name), against)
        flavour = f"video-{self.settings.video_backend}"
        self.registry.record_verdict(name, version, flavour, verdict.record(flavour))
        log.info("video gate %s %s:%s %s", "passed" if verdict.passed else "refused", name, version, verdict.metrics)
        return verdict

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
        for engine in [*self.engines.values(), *self._retired]:
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
        with self._cv:
            engine = self.engine(model)
            self._opening[id(engine)] = self._opening.get(id(engine), 0) + 1
        try:
            engine.validate(frames, steps, seed, self.settings.video_max_frames, hybrid)
            session = engine.open(prompt, frames, steps, seed, hybrid)
        except Overloaded:
            self.metrics.video_rejected.labels("capacity").inc()
            raise
        finally:
            with self._cv:
                self._opening[id(engine)] -= 1
                if not self._opening[id(engine)]:
                    del self._opening[id(engine)]
        stream = Stream(model, engine, session, deliver)
        with self._cv:
            self._streams.add(stream)
            self.metrics.video_sessions.labels(model).set(self._active(model))
            self._cv.notify_all()
        return stream

    def _active(self, model: str) -> int:
        """Open sessions of `model` across its versions (the serving one and retired ones)."""
        engines = [e for e in [self.engines.get(model), *self._retired] if e is not None and e.info.model == model]
        return sum(e.active for e in engines)

    def steer(self, stream: Stream, prompt: str) -> None:
        stream.engine.steer(stream.session, prompt)

    def sent(self, stream: Stream) -> None:
        """The handler sent one frame: the session may run ahead again."""
        with self._cv:
            stream.buffered -= 1
            self._cv.notify_all()

    def close_stream(self, stream: Stream) -> None:
        """Free the session's row now (the client left, or the stream ended)."""
        stream.engine.close(stream.session)
        with self._cv:
            self._streams.discard(stream)
            self.metrics.video_sessions.labels(stream.model).set(self._active(stream.model))

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
            by_engine: dict[int, list[Stream]] = {}
            for s in runnable:
                by_engine.setdefault(id(s.engine), []).append(s)
            for streams in by_engine.values():
                engine, model = streams[0].engine, streams[0].model
                try:
                    frames = engine.advance([s.session for s in streams])
                except Exception:  # a broken engine must not take the process down: end these streams
                    log.exception("video engine %s:%s failed", model, engine.info.version)
                    for s in streams:
                        engine.close(s.session)
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
                    "model_version": stream.engine.info.version,
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
