"""The router ingress's metrics: the catalogue's router metrics (`replicas.metrics`: names, labels, buckets),
recorded to Ray's metrics export (dashboards, alerts) and to this ingress's own prometheus registry, which
GET /metrics serves in the text format.

The request router choosing replicas for this ingress's handle runs in the same process but on Serve's
router loop, and records to Ray's export only. Its Redis figures (index lookup failures, fallbacks, breaker
state: `router.replica_choice.redis_routing_stats`) are copied into this registry at each scrape, so GET
/metrics shows Redis trouble without a Prometheus scraping Ray.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from replicas.metrics import BREAKER_STATES, CATALOGUE, MetricsRecorder
from router.replica_choice import RedisRoutingStats, redis_routing_stats

log = logging.getLogger("llm_cluster.router")

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUTER_METRICS = tuple(name for name, spec in CATALOGUE.items() if spec.recorded_by == "router")
REDIS_ROUTING_METRICS = ("llmc_router_index_lookup_failures_total", "llmc_redis_fallbacks_total",
                         "llmc_router_redis_breaker_state")


def request_status(http_status: int | None = None, *, cancelled: bool = False) -> str:
    """The llmc_requests_total status label for a finished request."""
    if cancelled:
        return "cancelled"
    if http_status is None or http_status < 400:
        return "ok"
    return {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
            429: "overloaded", 503: "unavailable"}.get(http_status, "bad_request" if http_status < 500 else "error")


class RequestObserver:
    """One request's latency and token metrics, as the router ingress sees them.

    Create at request arrival, call `tokens(n)` for every streamed chunk with n new tokens, and
    `finish(...)` exactly once (also on errors and cancellation)."""

    __slots__ = ("_rec", "_model", "_t0", "_last")

    def __init__(self, recorder: MetricsRecorder, model: str, start: float | None = None):
        self._rec, self._model = recorder, model
        self._t0 = time.perf_counter() if start is None else start
        self._last: float | None = None

    def tokens(self, n: int = 1, now: float | None = None) -> None:
        if n <= 0:
            return
        now = time.perf_counter() if now is None else now
        if self._last is None:
            self._rec.observe("llmc_time_to_first_token_seconds", now - self._t0, model=self._model)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._rec.observe("llmc_inter_token_latency_seconds", gap, model=self._model)
        self._last = now

    def finish(self, status: str, prompt_tokens: int = 0, generation_tokens: int = 0,
               now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        rec, model = self._rec, self._model
        rec.inc("llmc_requests_total", status=status, model=model)
        if status == "ok":
            rec.observe("llmc_e2e_request_latency_seconds", now - self._t0, model=model)
        if prompt_tokens:
            rec.inc("llmc_prompt_tokens_total", prompt_tokens, model=model)
        if generation_tokens:
            rec.inc("llmc_generation_tokens_total", generation_tokens, model=model)


class RouterMetrics:
    def __init__(self, model: str, *, ray: bool):
        self.model = model
        self.registry = CollectorRegistry()  # per instance: several apps in one process never collide
        self.rec = MetricsRecorder(ROUTER_METRICS, ray=ray, registry=self.registry,
                                   default_labels={"model": model})
        # Registry only: the request router exports these to Ray itself.
        self._redis = MetricsRecorder(REDIS_ROUTING_METRICS, ray=False, registry=self.registry,
                                      default_labels={"model": model, "component": "router"})
        self._redis_copied: dict[tuple[str, str], int] = {}  # (metric, reason) -> total copied so far

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

    def redis_routing(self) -> RedisRoutingStats:
        """This process's request routers on Redis, for this ingress's model."""
        return redis_routing_stats(self.model)

    def _copy_redis_routing(self) -> None:
        s = self.redis_routing()
        for name, totals in (("llmc_router_index_lookup_failures_total", s.lookup_failures),
                             ("llmc_redis_fallbacks_total", s.fallbacks)):
            for reason, total in totals.items():
                delta = total - self._redis_copied.get((name, reason), 0)  # process totals only grow
                if delta > 0:
                    self._redis.inc(name, delta, reason=reason)
                    self._redis_copied[(name, reason)] = total
        if s.breaker is not None:  # no sample until a router has opened the index
            self._redis.set("llmc_router_redis_breaker_state", BREAKER_STATES[s.breaker])

    def render(self) -> bytes:
        try:
            self._copy_redis_routing()
        except Exception:  # noqa: BLE001 — the request metrics are served all the same
            log.warning("router Redis metrics unavailable", exc_info=True)
        return generate_latest(self.registry)
