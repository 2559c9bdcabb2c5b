"""Prometheus metrics of one service process (its own registry, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("urd_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("urd_request_seconds", "request latency by route", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.decisions = Counter("urd_decisions", "decisions by category, model version and decision",
                                 ["category", "model_version", "decision"], registry=self.registry)
        self.queue_depth = Gauge("urd_queue_depth", "requests waiting for a batch, per category", ["category"], registry=self.registry)
        self.batch_size = Histogram("urd_batch_size", "images per ONNX Runtime call", ["category"], buckets=(1, 2, 4, 8, 16, 32),
                                    registry=self.registry)
        self.inference = Histogram("urd_inference_seconds", "ONNX Runtime time per batch", ["category"], buckets=LATENCY_BUCKETS,
                                   registry=self.registry)
        self.prepare = Histogram("urd_prepare_seconds", "decoding, checking and resizing one upload", ["category"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.record = Histogram("urd_record_seconds", "storing the images and committing the ledger records of one batch", ["category"],
                                buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter("urd_overload", "requests answered 503 because a queue was full or the ledger down", ["reason"],
                                registry=self.registry)
        self.model_version = Gauge("urd_model_info", "1 for the model version each category serves", ["category", "model_version", "digest"],
                                   registry=self.registry)
