"""The metric catalogue: every llm-cluster metric's name, type, help, labels and buckets, in one place,
the one recorder that creates and records them, and one replica's recorder (`ReplicaMetrics`). The lowest
serving module: the router (`router/metrics.py`) and the autoscaling policy record through it too.

Backends: `ray.util.metrics` (exported by each node's Ray metrics agent, so Prometheus, Grafana and the
Ray dashboard see them with Ray's `ray_` prefix: `llmc_requests_total` -> `ray_llmc_requests_total`,
histograms as `ray_<name>_bucket/_sum/_count`) and/or `prometheus_client` objects in a given registry
(the router's own GET /metrics, where names stay unprefixed).

Who records what (all through `MetricsRecorder`; the helpers below wrap the common patterns):

| recorded by | metrics |
|---|---|
| router ingress (`router/api.py`) via `router.metrics.RequestObserver` | llmc_requests_total, llmc_time_to_first_token_seconds, llmc_inter_token_latency_seconds, llmc_e2e_request_latency_seconds, llmc_prompt_tokens_total, llmc_generation_tokens_total |
| router ingress (failover loop, admission) | llmc_request_retries_total, llmc_failovers_total, llmc_router_queued_requests, llmc_router_in_flight_requests |
| request router (`router/routing.py`) | llmc_routing_decisions_total, llmc_router_prefix_query_tokens_total, llmc_router_prefix_hit_tokens_total, llmc_router_index_lookup_seconds, llmc_router_index_lookup_failures_total, llmc_redis_fallbacks_total{component="router"}, llmc_router_redis_breaker_state |
| router ingress GET /metrics, copied from the request router of its own process at each scrape (`router/metrics.py`) | llmc_router_index_lookup_failures_total, llmc_redis_fallbacks_total{component="router"}, llmc_router_redis_breaker_state |
| replica (`ReplicaMetrics`: `EngineStatsExporter` fed once a second) | llmc_num_requests_waiting, llmc_num_requests_running, llmc_pending_prefill_tokens, llmc_kv_cache_usage_ratio, llmc_prefix_cache_query_tokens_total, llmc_prefix_cache_hit_tokens_total, llmc_num_preemptions_total |
| replica KV event publisher (`kvstore/`, its `on_fallback` -> `ReplicaMetrics`) | llmc_redis_fallbacks_total{component="publisher"} |
| autoscaling policy (`router/autoscaling.py`, runs in the Serve controller) | llmc_autoscaling_desired_replicas, llmc_autoscaling_actual_replicas |

Hit rates are ratios of counters, taken in PromQL (rate(hit)/rate(query)), never pre-divided: a ratio
gauge cannot be aggregated across replicas or time windows.
"""  # noqa: E501 - the table's rows
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

log = logging.getLogger("ray.serve")

Kind = Literal["counter", "gauge", "histogram"]

PREFIX = "llmc_"
RAY_EXPORT_PREFIX = "ray_"  # what Ray's metrics agent puts in front of custom metric names

# Allowed values of the low-cardinality labels (documented contract; the recorder does not check values).
REQUEST_STATUSES = ("ok", "cancelled", "bad_request", "unauthorized", "not_found", "too_large",
                    "overloaded", "unavailable", "error")
ROUTING_OUTCOMES = (
    "cache_hit",        # the chosen replica holds at least one block of the prompt
    "cache_miss",       # no candidate holds any block: chosen by load
    "load_override",    # a candidate with a longer cached prefix was passed over for its load
    "local_fallback",   # the prefix index did not answer (Redis slow or down): chosen on this router's own
                        # recent decisions for the prompt's prefix, weighed against load
    "index_fallback",   # the prefix index did not answer and this router had not routed the prefix: by load
    "no_lookup",        # the policy does not use the index (round_robin, pow2)
)
RETRY_REASONS = ("replica_died", "replica_unavailable", "rejected", "error")
FAILOVER_OUTCOMES = ("resumed", "exhausted")
# Why a request router's prefix-index lookup did not answer: Redis past its budget, a Redis error
# (refused, reset, script error), or not asked at all because the breaker was open after a failure.
LOOKUP_FAILURE_REASONS = ("timeout", "error", "breaker_open")
# The KV publisher gives up Redis operations for "timeout" or "error"; the request router also routes
# around an open breaker ("breaker_open"), and counts "error" for a Redis URL it could not use at all.
REDIS_FALLBACK_REASONS = ("timeout", "error", "breaker_open")
# llmc_router_redis_breaker_state's values. Half-open: the skip period after a failure is over but no
# lookup has reached Redis since, so the next ones probe it.
BREAKER_STATES = {"closed": 0.0, "half_open": 0.5, "open": 1.0}

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    recorded_by: str = ""


_SPECS = (
    # ---- requests, recorded by the router ingress (client-observed)
    MetricSpec("llmc_requests_total", "counter", "Finished API requests by final status.",
               ("model", "status"), recorded_by="router"),
    MetricSpec("llmc_time_to_first_token_seconds", "histogram",
               "Time from request arrival at the router to the first streamed token.",
               ("model",), _TTFT_BUCKETS, "router"),
    MetricSpec("llmc_inter_token_latency_seconds", "histogram",
               "Time between consecutive streamed tokens (a chunk of n tokens counts n gaps of dt/n).",
               ("model",), _ITL_BUCKETS, "router"),
    MetricSpec("llmc_e2e_request_latency_seconds", "histogram",
               "Time from request arrival to the last token, for requests that finished ok.",
               ("model",), _E2E_BUCKETS, "router"),
    MetricSpec("llmc_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               ("model",), recorded_by="router"),
    MetricSpec("llmc_generation_tokens_total", "counter", "Generated tokens sent to clients.",
               ("model",), recorded_by="router"),
    MetricSpec("llmc_request_retries_total", "counter",
               "Attempts resubmitted to another replica before the first token.",
               ("model", "reason"), recorded_by="router"),
    MetricSpec("llmc_failovers_total", "counter",
               "Mid-stream failovers: streams resumed on another replica, or given up after max attempts.",
               ("model", "outcome"), recorded_by="router"),
    MetricSpec("llmc_router_queued_requests", "gauge", "Admitted requests waiting for their first token.",
               ("model",), recorded_by="router"),
    MetricSpec("llmc_router_in_flight_requests", "gauge", "Requests being served by this router process.",
               ("model",), recorded_by="router"),
    # ---- routing, recorded by the request router
    MetricSpec("llmc_routing_decisions_total", "counter", "Replica choices by routing policy and outcome.",
               ("policy", "outcome"), recorded_by="request router"),
    MetricSpec("llmc_router_prefix_query_tokens_total", "counter",
               "Prompt tokens the router looked up in the prefix index.", ("policy",), recorded_by="request router"),
    MetricSpec("llmc_router_prefix_hit_tokens_total", "counter",
               "Prompt tokens the router predicted cached on the replica it chose.",
               ("policy",), recorded_by="request router"),
    MetricSpec("llmc_router_index_lookup_seconds", "histogram",
               "Prefix index lookups that answered, as the request router waited for them (its event loop's "
               "delays included): compare with router.redis_timeout_ms. Failed ones count in "
               "llmc_router_index_lookup_failures_total.",
               ("model",), _LOOKUP_BUCKETS, "request router"),
    MetricSpec("llmc_router_index_lookup_failures_total", "counter",
               "Prefix index lookups that did not answer, by reason: timeout (past router.redis_timeout_ms), "
               "error (Redis refused or failed), breaker_open (not asked: a lookup failed moments ago).",
               ("model", "reason"), recorded_by="request router"),
    MetricSpec("llmc_redis_fallbacks_total", "counter",
               "Redis given up on and worked around. component=router: requests routed without the prefix "
               "index (by load, or on the router's own recent decisions), by the reason the index did not "
               "answer; component=publisher: KV events dropped.",
               ("component", "reason"), recorded_by="request router, KV publisher"),
    MetricSpec("llmc_router_redis_breaker_state", "gauge",
               "The request router's breaker around prefix index lookups: 0 closed (lookups go to Redis), "
               "0.5 half-open (the skip period is over, the next lookups probe Redis), 1 open (lookups "
               "skipped, routing without the index). Several routers of one process: the most open one.",
               ("model",), recorded_by="request router"),
    # ---- engine state, recorded by each replica
    MetricSpec("llmc_num_requests_waiting", "gauge", "Requests queued in the replica's engine, not yet running.",
               ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_num_requests_running", "gauge", "Requests in the replica's running batch.",
               ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_pending_prefill_tokens", "gauge", "Prompt tokens queued for prefill in the replica.",
               ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_kv_cache_usage_ratio", "gauge", "Share of the replica's KV cache blocks in use (0-1).",
               ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_prefix_cache_query_tokens_total", "counter",
               "Prompt tokens the engine looked up in its prefix cache.", ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens the engine found in its prefix cache (prefill skipped).",
               ("model", "replica"), recorded_by="replica"),
    MetricSpec("llmc_num_preemptions_total", "counter", "Running requests preempted for lack of KV blocks.",
               ("model", "replica"), recorded_by="replica"),
    # ---- autoscaling, recorded by the policy in the Serve controller
    MetricSpec("llmc_autoscaling_desired_replicas", "gauge", "Replica count the autoscaling policy asks for.",
               ("application", "deployment"), recorded_by="autoscaler"),
    MetricSpec("llmc_autoscaling_actual_replicas", "gauge", "Replica count running when the policy decided.",
               ("application", "deployment"), recorded_by="autoscaler"),
)

CATALOGUE: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def exported_names(spec: MetricSpec, ray: bool = True) -> tuple[str, ...]:
    """The series names Prometheus stores for a metric (what dashboards and alerts must use)."""
    base = (RAY_EXPORT_PREFIX if ray else "") + spec.name
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


# ---------------------------------------------------------------- backends


def _ray_metric(spec: MetricSpec):
    from ray.util import metrics as rm

    if spec.kind == "counter":
        return rm.Counter(spec.name, description=spec.help, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return rm.Gauge(spec.name, description=spec.help, tag_keys=spec.labels)
    return rm.Histogram(spec.name, description=spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels)


def _prometheus_metric(spec: MetricSpec, registry):
    import prometheus_client as pc

    if spec.kind == "counter":
        return pc.Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return pc.Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return pc.Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=registry)


class _Sink:
    """One catalogue metric bound to its backends, with the recorder's default labels pre-applied."""

    __slots__ = ("spec", "ray", "prom", "defaults")

    def __init__(self, spec: MetricSpec, ray_obj, prom_obj, defaults: dict[str, str]):
        self.spec, self.ray, self.prom, self.defaults = spec, ray_obj, prom_obj, defaults

    def record(self, method: str, value: float, labels: dict[str, Any]) -> None:
        if self.defaults:
            labels = {**self.defaults, **labels}
        if set(labels) != set(self.spec.labels):
            raise ValueError(f"{self.spec.name} takes labels {self.spec.labels}, got {tuple(labels)}")
        if self.ray is not None:
            tags = {k: str(v) for k, v in labels.items()}
            if method == "inc":
                self.ray.inc(value, tags=tags)
            elif method == "set":
                self.ray.set(value, tags=tags)
            else:
                self.ray.observe(value, tags=tags)
        if self.prom is not None:
            child = self.prom.labels(**labels) if labels else self.prom
            getattr(child, method)(value)


_METHOD_KINDS = {"inc": "counter", "set": "gauge", "observe": "histogram"}


class MetricsRecorder:
    """Creates the named catalogue metrics once (per process) and records them.

    `ray=True` records through ray.util.metrics (must run inside a Ray worker or driver);
    `registry=` a prometheus_client CollectorRegistry also records there. `default_labels` fill the
    labels a metric has (e.g. model, replica) so call sites pass only what varies.
    """

    def __init__(self, names: Iterable[str] | None = None, *, ray: bool = True, registry=None,
                 default_labels: Mapping[str, Any] | None = None):
        if not ray and registry is None:
            raise ValueError("MetricsRecorder needs a backend: ray=True and/or a prometheus registry")
        defaults = {k: str(v) for k, v in (default_labels or {}).items()}
        self._sinks: dict[str, _Sink] = {}
        for name in (CATALOGUE if names is None else names):
            spec = CATALOGUE[name]  # KeyError: not in the catalogue, add it there first
            self._sinks[name] = _Sink(
                spec, _ray_metric(spec) if ray else None,
                _prometheus_metric(spec, registry) if registry is not None else None,
                {k: v for k, v in defaults.items() if k in spec.labels})

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        self._sink(name, "inc").record("inc", value, labels)

    def set(self, name: str, value: float, **labels: Any) -> None:
        self._sink(name, "set").record("set", value, labels)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        self._sink(name, "observe").record("observe", value, labels)

    def _sink(self, name: str, method: str) -> _Sink:
        try:
            sink = self._sinks[name]
        except KeyError:
            raise KeyError(f"{name} is not recorded by this MetricsRecorder (names={list(self._sinks)})") from None
        if sink.spec.kind != _METHOD_KINDS[method]:
            raise TypeError(f"{name} is a {sink.spec.kind}; {method}() is for a {_METHOD_KINDS[method]}")
        return sink


# ---------------------------------------------------------------- call-site helpers


REPLICA_METRICS = ("llmc_num_requests_waiting", "llmc_num_requests_running", "llmc_pending_prefill_tokens",
                   "llmc_kv_cache_usage_ratio", "llmc_prefix_cache_query_tokens_total",
                   "llmc_prefix_cache_hit_tokens_total", "llmc_num_preemptions_total")

# engine stats field -> counter; the engine keeps cumulative totals, the exporter adds the deltas.
_ENGINE_COUNTERS = {"prefix_query_tokens": "llmc_prefix_cache_query_tokens_total",
                    "prefix_hit_tokens": "llmc_prefix_cache_hit_tokens_total",
                    "num_preemptions": "llmc_num_preemptions_total"}
_ENGINE_GAUGES = {"num_waiting": "llmc_num_requests_waiting", "num_running": "llmc_num_requests_running",
                  "pending_prefill_tokens": "llmc_pending_prefill_tokens", "kv_usage": "llmc_kv_cache_usage_ratio"}


class EngineStatsExporter:
    """Turns a replica's engine stats snapshots into the replica metrics. Call `observe(stats)` with
    `engine.stats().model_dump()` (or `LLMReplica.stats()`) every second or so."""

    def __init__(self, model: str, replica: str, *, ray: bool = True, registry=None):
        self._rec = MetricsRecorder(REPLICA_METRICS, ray=ray, registry=registry,
                                    default_labels={"model": model, "replica": replica})
        self._last = dict.fromkeys(_ENGINE_COUNTERS, 0)

    def observe(self, stats: Mapping[str, Any]) -> None:
        for field, name in _ENGINE_GAUGES.items():
            self._rec.set(name, float(stats[field]))
        for field, name in _ENGINE_COUNTERS.items():
            total = int(stats[field])
            # A total below the last one means the engine was restarted: all of it is new.
            delta = total - self._last[field] if total >= self._last[field] else total
            self._last[field] = total
            if delta:
                self._rec.inc(name, delta)


# ---------------------------------------------------------------- one replica's recorder

# ReplicaMetrics: engine state (queues, KV usage, prefix-cache and preemption totals) is sampled by a small
# asyncio task on the replica's event loop every `period_s`: one `engine.stats()` read per second, nothing in the
# engine step, and independent of the rate at which Serve polls routing stats. The KV event publisher's Redis
# fallbacks are counted as they happen, from the publisher's task on the same loop (never from the engine
# thread's block hooks).
PERIOD_S = 1.0


class ReplicaMetrics:
    def __init__(self, model: str, replica_id: str, stats: Callable[[], Mapping[str, Any]], *,
                 period_s: float = PERIOD_S, ray: bool = True, registry=None):
        self.engine = EngineStatsExporter(model, replica_id, ray=ray, registry=registry)
        self._redis = MetricsRecorder(["llmc_redis_fallbacks_total"], ray=ray, registry=registry,
                                      default_labels={"component": "publisher"})
        self._stats = stats
        self.period_s = period_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling on the running loop; without one (constructed outside Serve) it does nothing."""
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="replica-metrics")

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def export(self) -> None:
        """Record one engine stats sample now."""
        self.engine.observe(self._stats())

    def redis_fallback(self, reason: str) -> None:
        """KVEventPublisher's `on_fallback`: one Redis operation given up ("timeout" or "error")."""
        self._redis.inc("llmc_redis_fallbacks_total", reason=reason)

    async def _run(self) -> None:
        failed = False
        while True:
            try:
                self.export()
                failed = False
            except Exception as e:  # noqa: BLE001 - metrics never take the replica down; say so once
                if not failed:
                    log.warning("replica metrics export failed: %r", e)
                failed = True
            await asyncio.sleep(self.period_s)
