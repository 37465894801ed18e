"""Streaming in the gateway: the stream engines' sessions and the one thread that steps them.

A stream is stateful (its KV cache lives in one engine row), so it is served by the process that
holds its WebSocket, not through the job queue: video scales out with gateway replicas, each admitting
up to `video_max_sessions` streams per video model. Which version a new session opens on is the
version lifecycle's business (`service/versions.py`, the same as for images: a new version loads beside
the serving one, passes the gate, may take a canary share of new sessions, then takes them all); a
session finishes on the version it opened on, and an old version is unloaded with its last session.

One driver thread runs every step boundary: each open session that is not finished and whose client
has read its frames (at most `video_buffer_frames` unsent) takes one step, all sessions of one engine
in one batched call. Finished frames are PNG-encoded here and handed to the session's WebSocket
handler. A watch thread follows the registry every `watch_interval_s`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fewstep.engines.base import Frame, Session, StreamEngine, StreamRequest
from fewstep.engines.pixels import encode_png
from fewstep.engines.specs import VideoSpec
from fewstep.errors import Overloaded
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.versions import Versions

log = logging.getLogger("fewstep.service")
Deliver = Callable[[Frame | None, str], None]
"""Gets each frame and its PNG (base64); None when the engine failed and the stream must end."""


@dataclass(eq=False)
class Stream:
    """One WebSocket's session and where its frames go."""

    model: str
    engine: StreamEngine
    """The engine (model version) the session lives on: it finishes there, even after a newer version
    of the model took over new sessions."""
    session: Session
    deliver: Deliver
    buffered: int = 0
    """Frames made and not yet sent by the handler."""
    last_at: float = field(default_factory=time.perf_counter)
    stalled: bool = False
    """It waited on its client since its last frame: that interval is not the engine's latency."""
    failed: bool = False
    paced: bool = True
    """Whether its client's reading paces it (a WebSocket: at most `video_buffer_frames` unsent, frames sent as PNG).
    A clip (`service/clips.py`) keeps each frame's pixels as it is made: never paced, no PNG."""


class VideoStreams:
    """The stream sessions of this process and the driver thread that steps them."""

    def __init__(self, settings: Settings, metrics: Metrics, versions: Versions[StreamEngine]) -> None:
        self.settings, self.metrics, self.versions = settings, metrics, versions
        self._streams: set[Stream] = set()
        self._opening: dict[int, tuple[StreamEngine, int]] = {}
        """Sessions being opened per engine (by id): an engine is not unloaded under them."""
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, seeded: threading.Event) -> None:
        """Load once the registry is seeded (`seeded`), then drive sessions until `close`."""

        def run() -> None:
            seeded.wait()
            if self.settings.video_max_sessions == 0:
                self.versions.skip()  # this process serves no video
                return
            from fewstep.engines.backends.torch import set_intra_op_threads

            set_intra_op_threads(
                self.settings.intra_op_threads(self.settings.engine_threads(self.settings.embedded_workers))
            )
            self.versions.load()
            threading.Thread(target=self._watch, name="video-watch", daemon=True).start()
            self._drive()

        self._thread = threading.Thread(target=run, name="video-driver", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        """Follow the registry every `watch_interval_s` until `close`."""
        while not self._stopping.wait(self.settings.watch_interval_s):
            try:
                self.maintain()
            except Exception:  # the watch must outlive any one bad version or registry hiccup
                log.exception("video registry watch failed; retrying in %.0f s", self.settings.watch_interval_s)

    def maintain(self) -> None:
        """Follow the registry; unload versions no session holds any more."""
        with self._cv:
            in_use = [s.engine for s in self._streams] + [e for e, _ in self._opening.values()]
        self.versions.maintain(in_use)

    def close(self) -> None:
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.versions.close()

    @property
    def ready(self) -> bool:
        return self.versions.loaded.is_set()

    # -- sessions ---------------------------------------------------------------------------------
    def spec(self, model: str) -> VideoSpec:
        spec = self.versions.spec(model)
        assert isinstance(spec, VideoSpec)
        return spec

    def open(self, model: str, request: StreamRequest, deliver: Deliver, paced: bool = True) -> Stream:
        """A new session on the version new sessions of `model` open on (a canary takes its share). `paced`: see
        `Stream.paced`."""
        with self._cv:
            engine = self.versions.engine(model, secrets.token_hex(8))
            held = self._opening.get(id(engine), (engine, 0))[1]
            self._opening[id(engine)] = (engine, held + 1)
        try:
            session = engine.open(request)
        except Overloaded:
            self.metrics.video_rejected.labels("capacity").inc()
            raise
        finally:
            with self._cv:
                left = self._opening[id(engine)][1] - 1
                if left:
                    self._opening[id(engine)] = (engine, left)
                else:
                    del self._opening[id(engine)]
        stream = Stream(model, engine, session, deliver, paced=paced)
        with self._cv:
            self._streams.add(stream)
            self._count(model)
            self._cv.notify_all()
        return stream

    def _count(self, model: str) -> None:
        self.metrics.video_sessions.labels(model).set(sum(1 for s in self._streams if s.model == model))

    def steer(self, stream: Stream, prompt: str) -> None:
        stream.engine.steer(stream.session, prompt)

    def sent(self, stream: Stream) -> None:
        """The handler sent one frame: the session may run ahead again."""
        with self._cv:
            stream.buffered -= 1
            self._cv.notify_all()

    def close_stream(self, stream: Stream) -> None:
        """Free the session's row now (the client left, or the stream ended); count it for a canary."""
        session = stream.session
        stream.engine.end(session)
        ok = False if stream.failed else (True if session.finished else None)  # a client that left says nothing
        self.versions.record(stream.model, stream.engine, ok)
        with self._cv:
            self._streams.discard(stream)
            self._count(stream.model)

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
                    log.exception("video engine %s:%s failed", model, engine.spec.version)
                    for s in streams:
                        s.failed = True
                        engine.end(s.session)
                        s.deliver(None, "")
                    continue
                for s in streams:
                    if s.session.error is not None:  # failed alone (the engine ended it): its neighbours go on
                        log.warning("video session on %s:%s failed: %s", model, engine.spec.version, s.session.error)
                        s.failed = True
                        s.deliver(None, "")
                owner = {id(s.session): s for s in streams}
                now = time.perf_counter()
                for f in frames:
                    s = owner[id(f.session)]
                    if f.index == 0:
                        self.metrics.video_ttff.labels(model).observe(now - f.session.opened_at)
                    elif not s.stalled:
                        interval = now - s.last_at
                        steps = str(f.session.request.steps)
                        self.metrics.video_frame_seconds.labels(model, steps).observe(interval)
                        if interval > late_after:
                            self.metrics.video_late_frames.labels(model).inc()
                    s.last_at, s.stalled = now, False
                    if not s.paced:
                        s.deliver(f, "")
                        continue
                    with self._cv:
                        s.buffered += 1
                    s.deliver(f, encode_png(f.pixels))
