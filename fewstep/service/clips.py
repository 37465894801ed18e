"""Videos as jobs: the gateway's clip driver claims the video lane and makes each clip as a stream session.

A video (`POST /v1/videos`) is one work item on the queue's video lane: a `StreamRequest` (prompt, frames, steps,
seed). Only this driver claims that lane, in the gateway process that has the video engines loaded
(`VideoStreams`): a clip is a session on the same engines and rows as the WebSocket streams, advanced by the same
driver thread in the same batched `advance` call per step boundary as every other session of its engine (why:
docs/decisions/video-jobs.md). At most `video_max_clips` clips run here at once; a clip whose model has no free
row waits for one, its item heartbeated.

This thread, not the stream driver, does the clip's queue calls and its encoding: at every frame a clip makes it
reports progress and asks whether the video was cancelled; a cancelled clip's session is ended at once (its row
free before the next step boundary), and its item ends `cancelled`. A finished clip is encoded to MP4
(`engines/mp4.py`) within `video_max_bytes` and written as its item's result, with the job's TTL.

Delivery is at least once, as for images: a gateway that dies mid-clip leaves its item to be reclaimed after
`claim_idle_s` by another gateway's driver (or dead-lettered after `max_deliveries`), which makes the clip again
from its seed: the same frames.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fewstep.engines.base import Frame, StreamRequest
from fewstep.engines.mp4 import encode_mp4
from fewstep.errors import Cancelled, FewstepError, GenerationFailed, NotReady, Overloaded
from fewstep.service.metrics import Metrics
from fewstep.service.queue.base import Delivery, ItemOutcome, ItemResult, JobQueue
from fewstep.service.queue.keys import VIDEO
from fewstep.service.settings import Settings
from fewstep.service.streams import Stream, VideoStreams

log = logging.getLogger("fewstep.service")
TICK_S = 0.25
"""Longest the driver sleeps while clips run: how late a cancellation of a clip that makes no frame is seen."""


@dataclass(eq=False)
class Clip:
    """One video being made here: its delivery, its session once open, and its frames so far."""

    delivery: Delivery
    stream: Stream | None = None
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    failed: bool = False
    reported: int = -1
    """The progress last written to the queue."""

    @property
    def request(self) -> StreamRequest:
        item = self.delivery.work.item
        assert isinstance(item, StreamRequest)  # the video lane carries clips only (`VideoClips._take`)
        return item

    @property
    def made(self) -> bool:
        return len(self.frames) >= self.request.frames


class VideoClips:
    """The videos this gateway makes, and the thread that claims, watches and finishes them."""

    def __init__(self, settings: Settings, metrics: Metrics, queue: JobQueue, streams: VideoStreams, name: str) -> None:
        self.settings, self.metrics, self.queue, self.streams = settings, metrics, queue, streams
        self.name = f"{name}-clips"
        self._clips: list[Clip] = []
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_at = self._reclaim_at = 0.0

    @property
    def limit(self) -> int:
        return min(self.settings.video_max_clips, self.settings.video_max_sessions)

    def start(self) -> None:
        """Claim videos once the video models are loaded, until `close`. A gateway with no video rows claims none."""
        if self.limit == 0:
            return
        self._thread = threading.Thread(target=self._run, name="video-clips", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A video was queued: look for it now rather than at the end of the round's wait (`TICK_S`)."""
        with self._cv:
            self._cv.notify_all()

    def close(self) -> None:
        """Stop claiming; clips in flight are left unacknowledged, for another gateway to take back."""
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self.streams.versions.loaded.wait(1.0):
            if self._stopping.is_set():
                return
        while not self._stopping.is_set():
            try:
                self._turn()
            except NotReady as e:  # the queue is away: clips keep running, their results wait
                log.warning("video clips: queue unreachable (%s); retrying", e)
                self._stopping.wait(1.0)
            except Exception:  # the driver outlives any one bad clip
                log.exception("video clip driver failed; retrying")
                self._stopping.wait(1.0)

    def _turn(self) -> None:
        """One round: take new videos, open waiting ones, end cancelled ones, report progress, finish made ones."""
        now = time.monotonic()
        if self._clips and now >= self._beat_at:
            self._beat_at = now + self.settings.heartbeat_s
            self.queue.heartbeat(self.name, [c.delivery for c in self._clips], (VIDEO,))
        if now >= self._reclaim_at:
            self._reclaim_at = now + self.settings.claim_idle_s / 2
            room = self.limit - len(self._clips)
            if room > 0:
                taken = self.queue.reclaim(
                    self.name, self.settings.claim_idle_s, self.settings.max_deliveries, room, (VIDEO,)
                )
                self._take(taken)
        room = self.limit - len(self._clips)
        if room > 0:
            block = 0.0 if self._clips else 1.0
            self._take(self.queue.claim(self.name, room, block, 0.0, (VIDEO,)))
        for clip in [c for c in self._clips if c.stream is None]:
            self._open(clip)
        self._cancel_gone()
        for clip in [c for c in self._clips if c.stream is not None]:
            if clip.failed and clip.stream is not None:  # the session's own error when it failed alone
                why = clip.stream.session.error or GenerationFailed("the video engine failed while making the clip")
                self._end(clip, why)
            elif clip.made:
                self._end(clip, None)
            else:
                self._report(clip)
        if self._clips:
            with self._cv:
                self._cv.wait(TICK_S)

    def _take(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            clip = Clip(d)
            if not isinstance(d.work.item, StreamRequest):  # the lane's contract: a misrouted item fails alone
                self._finish(clip, GenerationFailed("an image item on the video lane"))
                continue
            self._clips.append(clip)

    def _open(self, clip: Clip) -> None:
        """Open the clip's session; without a free row (or its model still loading) it waits for the next round."""

        def deliver(frame: Frame | None, _: str) -> None:
            with self._cv:
                if frame is None:
                    clip.failed = True
                else:
                    clip.frames[frame.index] = frame.pixels
                self._cv.notify_all()

        work = clip.delivery.work
        try:
            self.streams.spec(work.model).validate(clip.request, self.settings.video_max_frames)
            clip.stream = self.streams.open(work.model, clip.request, deliver, paced=False)
        except (Overloaded, NotReady):
            return
        except FewstepError as e:  # the model was removed, or its new version takes no such clip
            self._clips.remove(clip)
            self._finish(clip, e)

    def _cancel_gone(self) -> None:
        """End the sessions of cancelled (or expired) videos now, freeing their rows."""
        if not self._clips:
            return
        gone = self.queue.cancelled({c.delivery.work.job_id for c in self._clips})
        for clip in [c for c in self._clips if c.delivery.work.job_id in gone]:
            self._end(clip, Cancelled(f"cancelled after {len(clip.frames)} of {clip.request.frames} frames"))

    def _report(self, clip: Clip) -> None:
        percent = 99 * len(clip.frames) // clip.request.frames  # 100 once its MP4 is written
        if percent != clip.reported:
            clip.reported = percent
            self.queue.progress(clip.delivery.work.job_id, percent)

    def _end(self, clip: Clip, outcome: FewstepError | None) -> None:
        """Close the clip's session; encode it if it was made (`outcome` None), and write its result."""
        self._clips.remove(clip)
        if clip.stream is not None:
            self.streams.close_stream(clip.stream)
        if outcome is None:
            assert clip.stream is not None  # made: it had a session
            try:
                fps = clip.stream.engine.spec.fps or self.settings.video_fps
                frames = [clip.frames[i] for i in range(clip.request.frames)]
                mp4 = encode_mp4(frames, fps, self.settings.video_crf, self.settings.video_max_bytes)
            except FewstepError as e:
                outcome = e
            else:
                self._finish(clip, mp4)
                return
        self._finish(clip, outcome)

    def _finish(self, clip: Clip, made: bytes | FewstepError) -> None:
        """Write the clip's one result, retrying while the queue is away: a made clip must not be lost."""
        w = clip.delivery.work
        version = clip.stream.engine.spec.version if clip.stream is not None else None
        if isinstance(made, bytes):
            result = ItemResult(
                index=w.index,
                outcome="ok",
                seed=w.item.seed,
                request=w.request,
                steps=w.item.steps,
                nfe=clip.request.frames * w.item.steps,
                model_version=version,
                b64_json=base64.b64encode(made).decode(),
            )
        else:
            outcome: ItemOutcome = "cancelled" if isinstance(made, Cancelled) else "failed"
            result = ItemResult(
                w.index, outcome, w.item.seed, w.request, w.item.steps, model_version=version, error=str(made)
            )
        backoff = 0.1
        while True:
            try:
                [written] = self.queue.finish([(clip.delivery, result)])
                break
            except NotReady as e:
                if self._stopping.is_set():
                    return  # left unacknowledged: another gateway makes it again
                log.warning("video clips: cannot write a result (%s); retrying", e)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.metrics.worker_items.labels(result.outcome if written.wrote else "duplicate").inc()
        self.metrics.videos.labels(w.model, result.outcome).inc()
        if written.job_seconds is not None:
            self.metrics.job_seconds.observe(written.job_seconds)
