"""The metric catalogue: naming conventions, the recorder on both backends, the call-site helpers (the names
Ray's metrics export really gives them: tests/e2e/test_metrics_e2e.py)."""
from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from replicas.metrics import CATALOGUE, EngineStatsExporter, MetricsRecorder, exported_names
from router.metrics import RequestObserver, request_status


def test_catalogue_follows_prometheus_naming():
    for name, spec in CATALOGUE.items():
        assert name == spec.name and re.fullmatch(r"llmc_[a-z0-9_]+", name), name
        assert spec.help and spec.recorded_by, name
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) for label in spec.labels), name
        if spec.kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if spec.kind == "histogram":
            assert name.endswith("_seconds"), name
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0, name
        else:
            assert not spec.buckets, name


def test_catalogue_covers_the_operations_contract():
    required = {
        "llmc_requests_total": ("status",), "llmc_time_to_first_token_seconds": (),
        "llmc_inter_token_latency_seconds": (), "llmc_e2e_request_latency_seconds": (),
        "llmc_prompt_tokens_total": (), "llmc_generation_tokens_total": (),
        "llmc_num_requests_waiting": ("replica",), "llmc_num_requests_running": ("replica",),
        "llmc_kv_cache_usage_ratio": ("replica",), "llmc_prefix_cache_hit_tokens_total": ("replica",),
        "llmc_prefix_cache_query_tokens_total": ("replica",), "llmc_router_prefix_hit_tokens_total": ("policy",),
        "llmc_router_prefix_query_tokens_total": ("policy",),
        "llmc_routing_decisions_total": ("policy", "outcome"), "llmc_failovers_total": (),
        "llmc_request_retries_total": (), "llmc_redis_fallbacks_total": (),
        "llmc_autoscaling_desired_replicas": (), "llmc_autoscaling_actual_replicas": (),
    }
    for name, labels in required.items():
        assert name in CATALOGUE, name
        assert set(labels) <= set(CATALOGUE[name].labels), name


def test_request_observer_records_latencies_tokens_and_status():
    reg = CollectorRegistry()
    rec = MetricsRecorder(ray=False, registry=reg)
    obs = RequestObserver(rec, "m", start=100.0)
    obs.tokens(1, now=100.5)    # TTFT 0.5
    obs.tokens(2, now=100.7)    # two gaps of 0.1
    obs.tokens(0, now=100.8)    # empty chunk: nothing
    obs.finish("ok", prompt_tokens=7, generation_tokens=3, now=101.0)
    v = reg.get_sample_value
    assert v("llmc_time_to_first_token_seconds_count", {"model": "m"}) == 1
    assert v("llmc_time_to_first_token_seconds_sum", {"model": "m"}) == pytest.approx(0.5)
    assert v("llmc_inter_token_latency_seconds_count", {"model": "m"}) == 2
    assert v("llmc_inter_token_latency_seconds_sum", {"model": "m"}) == pytest.approx(0.2)
    assert v("llmc_e2e_request_latency_seconds_sum", {"model": "m"}) == pytest.approx(1.0)
    assert v("llmc_requests_total", {"model": "m", "status": "ok"}) == 1
    assert v("llmc_prompt_tokens_total", {"model": "m"}) == 7
    assert v("llmc_generation_tokens_total", {"model": "m"}) == 3

    failed = RequestObserver(rec, "m", start=0.0)
    failed.finish(request_status(503), now=5.0)
    assert v("llmc_requests_total", {"model": "m", "status": "unavailable"}) == 1
    assert v("llmc_e2e_request_latency_seconds_count", {"model": "m"}) == 1  # errors keep out of e2e


def test_request_status_labels():
    assert request_status(200) == "ok" and request_status(None) == "ok"
    assert request_status(200, cancelled=True) == "cancelled"
    assert [request_status(c) for c in (400, 401, 404, 413, 422, 429, 500, 503)] == [
        "bad_request", "unauthorized", "not_found", "too_large", "bad_request", "overloaded", "error", "unavailable"]


def _stats(**kw):
    base = dict(num_waiting=0, num_running=0, pending_prefill_tokens=0, kv_usage=0.0,
                prefix_query_tokens=0, prefix_hit_tokens=0, num_preemptions=0)
    return {**base, **kw}


def test_engine_stats_exporter_sets_gauges_and_adds_counter_deltas():
    reg = CollectorRegistry()
    exp = EngineStatsExporter("m", "r1", ray=False, registry=reg)
    labels = {"model": "m", "replica": "r1"}
    exp.observe(_stats(num_waiting=3, num_running=2, pending_prefill_tokens=40, kv_usage=0.5,
                       prefix_query_tokens=100, prefix_hit_tokens=60, num_preemptions=1))
    exp.observe(_stats(num_waiting=1, prefix_query_tokens=150, prefix_hit_tokens=60, num_preemptions=1))
    v = reg.get_sample_value
    assert v("llmc_num_requests_waiting", labels) == 1 and v("llmc_num_requests_running", labels) == 0
    assert v("llmc_prefix_cache_query_tokens_total", labels) == 150
    assert v("llmc_prefix_cache_hit_tokens_total", labels) == 60
    assert v("llmc_num_preemptions_total", labels) == 1
    exp.observe(_stats(prefix_query_tokens=20))  # engine restarted: its totals began again
    assert v("llmc_prefix_cache_query_tokens_total", labels) == 170


def test_recorder_rejects_misuse():
    rec = MetricsRecorder(["llmc_requests_total", "llmc_kv_cache_usage_ratio"], ray=False,
                          registry=CollectorRegistry(), default_labels={"model": "m", "replica": "r"})
    with pytest.raises(ValueError, match="labels"):
        rec.inc("llmc_requests_total")                       # status missing
    with pytest.raises(ValueError, match="labels"):
        rec.inc("llmc_requests_total", status="ok", policy="x")
    with pytest.raises(TypeError, match="counter"):
        rec.set("llmc_requests_total", 1, status="ok")
    with pytest.raises(KeyError):
        rec.inc("llmc_routing_decisions_total", policy="p", outcome="o")  # not created by this recorder
    with pytest.raises(KeyError):
        MetricsRecorder(["llmc_not_a_metric"], ray=False, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="backend"):
        MetricsRecorder(ray=False)


def test_prometheus_exposition_uses_catalogue_names():
    reg = CollectorRegistry()
    rec = MetricsRecorder(ray=False, registry=reg)
    _record_every_metric(rec)
    text = generate_latest(reg).decode()
    for spec in CATALOGUE.values():
        for series in exported_names(spec, ray=False):
            assert re.search(rf"^{series}{{", text, re.M), series


def _record_every_metric(rec: MetricsRecorder) -> None:
    for spec in CATALOGUE.values():
        labels = {k: "x" for k in spec.labels}
        {"counter": rec.inc, "gauge": rec.set, "histogram": rec.observe}[spec.kind](spec.name, 1.0, **labels)
