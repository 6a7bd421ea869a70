"""Prometheus metrics of one service process, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("sagrt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram("sagrt_request_latency_seconds", "time from request to full response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("sagrt_queue_wait_seconds", "time a request waited for the engine",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("sagrt_batch_size", "images per pipeline call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry)
        self.queue_depth = Gauge("sagrt_queue_depth", "requests waiting for the engine", registry=registry)
        self.step_seconds = Histogram("sagrt_step_seconds", "time of one denoising step of a call",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.in_flight = Gauge("sagrt_in_flight", "HTTP requests being served", registry=registry)
        self.cancellations = Counter("sagrt_cancellations", "requests stopped before their images, by reason",
                                     ["reason"], registry=registry)
        self.cancel_steps = Histogram("sagrt_cancel_steps", "denoising steps a call ran after its last request "
                                      "was cancelled", buckets=(0, 1, 2, 4, 8, 16), registry=registry)
        self.rejections = Counter("sagrt_rejections", "requests refused before queueing, by reason", ["reason"],
                                  registry=registry)
        self.ready = Gauge("sagrt_ready", "1 when the engine is loaded, warm and not draining", registry=registry)


METRIC_NAMES = ("sagrt_requests_total", "sagrt_request_latency_seconds", "sagrt_queue_wait_seconds",
                "sagrt_batch_size", "sagrt_queue_depth", "sagrt_step_seconds", "sagrt_in_flight",
                "sagrt_cancellations_total", "sagrt_cancel_steps", "sagrt_rejections_total", "sagrt_ready")
