"""Prometheus metrics of the gateway. One registry per app, so tests can run several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.batch_size = Histogram(
            "fewstep_batch_size", "Items per engine call.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "fewstep_batch_seconds", "Wall time of one engine call.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_waiting = Gauge("fewstep_queue_waiting_items", "Items waiting for an engine.", ["model"], registry=r)
        self.models_ready = Gauge("fewstep_models_ready", "Models loaded and serving.", registry=r)
        self.model_refused = Counter(
            "fewstep_model_versions_refused", "Model versions refused at load.", ["model"], registry=r
        )
