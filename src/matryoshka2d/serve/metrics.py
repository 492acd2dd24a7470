"""Prometheus metrics of one server (its own registry, so several apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from matryoshka2d.serve.batcher import BatchStats

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Requests by status and exit, queue size, batch sizes and tokens, queue / tokenise / inference time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("m2d_requests", "embedding requests by HTTP status and exit layer",
                                ["status", "layer"], registry=r)
        self.responses = Counter("m2d_http_responses", "every HTTP response by status (all paths; those the "
                                 "connection layer sends before a request reaches the app included)", ["status"],
                                 registry=r)
        self.inputs = Counter("m2d_inputs", "inputs embedded, by exit layer", ["layer"], registry=r)
        self.queue_rows = Gauge("m2d_queue_rows", "inputs waiting for a batch", registry=r)
        self.batch_rows = Histogram("m2d_batch_rows", "inputs per batch", buckets=_COUNTS, registry=r)
        self.batch_tokens = Histogram("m2d_batch_tokens", "padded tokens per batch", buckets=_TOKENS, registry=r)
        self.batch_real_tokens = Histogram("m2d_batch_real_tokens", "tokens per batch without padding",
                                           buckets=_TOKENS, registry=r)
        self.queue_seconds = Histogram("m2d_queue_seconds", "time from queueing to the first batch of a request",
                                       buckets=_SECONDS, registry=r)
        self.tokenize_seconds = Histogram("m2d_tokenize_seconds", "tokenisation time per request",
                                          buckets=_SECONDS, registry=r)
        self.inference_seconds = Histogram("m2d_inference_seconds", "model time per batch", buckets=_SECONDS,
                                           registry=r)
        self.request_seconds = Histogram("m2d_request_seconds", "embedding request time in the server",
                                         buckets=_SECONDS, registry=r)
        self.heap_trim_seconds = Histogram("m2d_heap_trim_seconds", "time to hand the free C heap back to the OS",
                                           buckets=_SECONDS, registry=r)

    def on_batch(self, stats: BatchStats) -> None:
        """Record one batch (called by the batcher thread)."""
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        self.batch_real_tokens.observe(stats.real_tokens)
        self.inference_seconds.observe(stats.inference_seconds)
        for seconds in stats.queue_seconds:
            self.queue_seconds.observe(seconds)
        for layer, rows in stats.layers.items():
            self.inputs.labels(layer=str(layer)).inc(rows)

    def on_response(self, status: int) -> None:
        """Count one HTTP response."""
        self.responses.labels(status=str(status)).inc()

    def on_trim(self, seconds: float) -> None:
        """Record one hand-back of the free heap (called by the batcher thread)."""
        self.heap_trim_seconds.observe(seconds)
