"""Prometheus metrics of gateways and workers. One registry per process part, so tests can run several.

Queue-wide numbers (depth, oldest item, in flight, reclaims, retries, dead letters, live
workers) are read from the queue at scrape time by `QueueCollector`, so any gateway reports
the state of the whole Redis queue, whichever worker changed it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fewstep.service.queue.base import QueueStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _torch() -> str:
    """torch's installed version, read without importing it (the gateway may never load torch)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


class Metrics:
    def __init__(self, role: str = "gateway") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.build_info = Info(
            "fewstep_build", "fewstep's version, the process's role and its Python and torch.", registry=r
        )
        self.build_info.info(
            {
                "version": metadata.version("fewstep"),
                "role": role,
                "python": platform.python_version(),
                "torch": _torch(),
            }
        )
        self.requests = Counter(
            "fewstep_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "fewstep_image_request_seconds",
            "Latency of image generation requests, by model and steps.",
            ["model", "steps"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("fewstep_images", "Images generated, by model and steps.", ["model", "steps"], registry=r)
        self.realtime_frames = Counter(
            "fewstep_realtime_frames",
            "Frames of real-time image sessions by outcome: served, dropped (a newer frame came before it was "
            "started: newest wins), failed.",
            ["model", "outcome"],
            registry=r,
        )
        self.realtime_seconds = Histogram(
            "fewstep_realtime_frame_seconds",
            "Real-time image frames: from the frame's arrival to its answer leaving.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.webhook_attempts = Counter(
            "fewstep_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered, failed (retried later), expired (given up after "
            "`webhook_retry_for_s`), refused (an address the settings do not allow).",
            ["outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "fewstep_batch_size",
            "Running-batch occupancy: items in one denoising step (network evaluation).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "fewstep_step_seconds",
            "Wall time of one batched denoising step.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_step_wait = Histogram(
            "fewstep_first_step_wait_seconds",
            "From queued to the item's first denoising step.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_items = Counter(
            "fewstep_worker_items",
            "Items finished by this process's workers, by outcome (duplicate: a redelivered item's result was "
            "already written).",
            ["outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "fewstep_job_seconds",
            "From submission to the last item's result, for jobs and synchronous requests.",
            buckets=(*LATENCY_BUCKETS, 120.0, 300.0, 900.0, 3600.0),
            registry=r,
        )
        self.models_ready = Gauge(
            "fewstep_models_ready", "Models with a version serving, by kind (image, video).", ["kind"], registry=r
        )
        self.models_unavailable = Gauge(
            "fewstep_models_unavailable",
            "Models with no version serving (every version refused), by kind: their requests get 503.",
            ["kind"],
            registry=r,
        )
        self.model_refused = Counter(
            "fewstep_model_versions_refused",
            "Model versions (or pointers) refused by loading, the serving gate or a canary.",
            ["model"],
            registry=r,
        )
        self.model_swaps = Counter(
            "fewstep_model_swaps", "Times a new version took over a model's new items.", ["model"], registry=r
        )
        self.model_load_seconds = Histogram(
            "fewstep_model_load_seconds",
            "Loading, warming up and gating one model version.",
            ["model"],
            buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.video_ttff = Histogram(
            "fewstep_video_time_to_first_frame_seconds",
            "From a video session's admission to its first frame being made.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.video_frame_seconds = Histogram(
            "fewstep_video_frame_seconds",
            "Per-frame latency: time between a session's consecutive frames, by model and steps.",
            ["model", "steps"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.video_late_frames = Counter(
            "fewstep_video_late_frames",
            "Frames made later than 1 / FEWSTEP_VIDEO_TARGET_FPS after the session's previous frame.",
            ["model"],
            registry=r,
        )
        self.video_frames = Counter("fewstep_video_frames", "Video frames sent to clients.", ["model"], registry=r)
        self.videos = Counter(
            "fewstep_videos",
            "Videos (`/v1/videos`) this gateway finished, by model and outcome.",
            ["model", "outcome"],
            registry=r,
        )
        self.video_sessions = Gauge("fewstep_video_sessions_active", "Open video sessions.", ["model"], registry=r)
        self.video_rejected = Counter(
            "fewstep_video_sessions_rejected",
            "Video sessions refused, by reason (capacity: all rows taken; invalid: a bad first message).",
            ["reason"],
            registry=r,
        )


class QueueCollector:
    """Reads `stats()` from a job queue at scrape time; `fewstep_queue_up` 0 when it cannot."""

    def __init__(self, stats: Callable[[], QueueStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fewstep_queue_up", "1 when the job queue answered this scrape.")
        try:
            st = self.stats()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("fewstep_queue_depth", "Items queued or running, by lane.", labels=["lane"])
        for lane, n in st.depth.items():
            depth.add_metric([lane], n)
        yield depth
        yield GaugeMetricFamily(
            "fewstep_queue_oldest_age_seconds", "Age of the oldest item not yet finished.", value=st.oldest_age_s
        )
        yield GaugeMetricFamily("fewstep_queue_in_flight", "Items handed to a worker.", value=st.in_flight)
        yield GaugeMetricFamily("fewstep_queue_workers", "Workers with a recent heartbeat.", value=st.workers)
        yield CounterMetricFamily("fewstep_queue_reclaims", "Items taken back from idle workers.", value=st.reclaims)
        yield CounterMetricFamily("fewstep_queue_retries", "Reclaimed items run again.", value=st.retries)
        yield CounterMetricFamily("fewstep_queue_dead_letters", "Items moved to the dead-letter stream.", value=st.dead)
