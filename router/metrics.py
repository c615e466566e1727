"""The router's own Prometheus metrics (prefix `llmc_`), served at GET /metrics in the text format.

Each ingress instance owns its registry, so several apps in one process (tests) never collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmc_router_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("llmc_router_ttft_seconds", "Time from request arrival to the first token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmc_router_itl_seconds", "Time between consecutive tokens of one choice",
                             ["endpoint"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmc_router_e2e_seconds", "Time from request arrival to its last token",
                             ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmc_router_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.cached_tokens = Counter("llmc_router_cached_prompt_tokens", "Prompt tokens served from KV cache",
                                     registry=r)
        self.completion_tokens = Counter("llmc_router_completion_tokens", "Tokens generated", registry=r)
        self.retries = Counter("llmc_router_retries", "Requests retried on another replica before their "
                               "first token", registry=r)
        self.failovers = Counter("llmc_router_failovers", "Streams resumed on another replica mid-generation",
                                 registry=r)
        self.queued = Gauge("llmc_router_queued_requests", "Admitted requests waiting for their first token",
                            registry=r)
        self.in_flight = Gauge("llmc_router_in_flight_requests", "Requests being served", registry=r)

    def on_failover_event(self, kind: str) -> None:
        (self.failovers if kind == "failover" else self.retries).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
