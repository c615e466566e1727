"""The router ingress's metrics: the catalogue's router metrics (`cluster.metrics`: names, labels, buckets),
recorded to Ray's metrics export (dashboards, alerts) and to this ingress's own prometheus registry, which
GET /metrics serves in the text format.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluster.metrics import CATALOGUE, MetricsRecorder, RequestObserver, request_status

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUTER_METRICS = tuple(name for name, spec in CATALOGUE.items() if spec.recorded_by == "router")


class RouterMetrics:
    def __init__(self, model: str, *, ray: bool):
        self.model = model
        self.registry = CollectorRegistry()  # per instance: several apps in one process never collide
        self.rec = MetricsRecorder(ROUTER_METRICS, ray=ray, registry=self.registry,
                                   default_labels={"model": model})

    def observer(self, start: float | None = None) -> RequestObserver:
        """TTFT/ITL/E2E, tokens and the final status of one generation request."""
        return RequestObserver(self.rec, self.model, time.perf_counter() if start is None else start)

    def request_done(self, http_status: int, cancelled: bool = False) -> None:
        """For API requests that ended before generation (rejected, not found, ...)."""
        self.rec.inc("llmc_requests_total", status=request_status(http_status, cancelled=cancelled))

    def retry(self, reason: str) -> None:
        self.rec.inc("llmc_request_retries_total", reason=reason)

    def failover(self, outcome: str) -> None:
        self.rec.inc("llmc_failovers_total", outcome=outcome)

    def load(self, queued: int, in_flight: int) -> None:
        self.rec.set("llmc_router_queued_requests", queued)
        self.rec.set("llmc_router_in_flight_requests", in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
