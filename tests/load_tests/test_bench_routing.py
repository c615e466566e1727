"""The routing benchmark's pieces that run without a cluster: the Ray baseline's view of our requests
and the parser of Ray's metrics export."""
from __future__ import annotations

import re

import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from load_tests import bench_routing
from load_tests.ray_prefix_baseline import RayPrefixCacheAffinityRouter
from replicas.engine.protocol import GenerationRequest


def _pending(*args) -> PendingRequest:
    return PendingRequest(args=list(args), kwargs={},
                          metadata=RequestMetadata(request_id="r", internal_request_id="r", call_method="generate"))


async def test_ray_baseline_sees_token_prefixes_as_text_prefixes():
    text = lambda ids: RayPrefixCacheAffinityRouter._extract_text_from_request(  # noqa: E731
        None, _pending(GenerationRequest(request_id="r", prompt_token_ids=ids)))
    a, b, c = text([1, 2, 3, 4]), text([1, 2, 3, 9, 9]), text([0, 2, 3])
    assert len(a) == 4 and b.startswith(a[:3]) and not b.startswith(a) and not c.startswith(a[:1])
    assert RayPrefixCacheAffinityRouter._extract_text_from_request(None, _pending()) is None  # model_info()


def test_ray_metrics_parser_sums_label_sets(monkeypatch):
    export = "\n".join([
        "# HELP ray_llmc_routing_decisions_total Replica choices",
        'ray_llmc_routing_decisions_total{Component="core_worker",outcome="cache_hit",policy="prefix"} 7.0',
        'ray_llmc_routing_decisions_total{Component="core_worker",outcome="cache_hit",policy="prefix",pid="2"} 3.0',
        'ray_llmc_routing_decisions_total{outcome="index_fallback",policy="prefix"} 2.0',
        'ray_llmc_requests_total{status="ok"} 99.0',
        'ray_llmc_redis_fallbacks_total{component="router",reason="timeout"} 4.0',
        'ray_llmc_redis_fallbacks_total{component="publisher",reason="timeout"} 5.0'])

    class Resp:
        text = export
    monkeypatch.setattr(bench_routing.httpx, "get", lambda *a, **k: Resp())
    assert bench_routing.ray_metrics(1) == {"cache_hit": 10.0, "index_fallback": 2.0}
    assert bench_routing.ray_metrics(1, "llmc_redis_fallbacks_total", "reason", 'component="router"') == \
        {"timeout": 4.0}


def test_lookup_latency_from_histogram_buckets():
    before = {"0.001": 2.0, "0.025": 3.0, "0.25": 3.0, "+Inf": 3.0}
    after = {"0.001": 42.0, "0.025": 93.0, "0.25": 102.0, "+Inf": 103.0}  # this run: 40, 50, 9, 1 per bucket
    got = bench_routing.lookup_latency(after, before, timeout_s=0.025)
    assert got == {"answered": 100.0, "p50_le_s": 0.025, "p99_le_s": 0.25, "within_timeout_share": 0.9,
                   "cumulative": {"0.001": 40.0, "0.025": 90.0, "0.25": 99.0, "inf": 100.0}}
    assert bench_routing.lookup_latency(before, before, 0.025) is None  # no lookups (pow2, round_robin)


def test_config_overrides_reach_every_policy_app():
    import argparse
    args = argparse.Namespace(block_size=16, kv_blocks_resolved=100, replicas=3, redis_timeout_ms=50.0,
                              prefix_weight=None, overrides=["router.balance_slack=8", "engine.max_num_seqs=4"])
    cfg = bench_routing.make_config("/m", "redis://127.0.0.1:1", "ray_prefix", args)
    assert (cfg.router.policy, cfg.router.balance_slack, cfg.engine.max_num_seqs) == ("prefix", 8, 4)
    assert cfg.router.prefix_weight == 2.0  # the config's default when --prefix-weight is not given


def test_rounds_rotate_the_order_and_keep_each_result_as_it_comes():
    ran, saved, results = [], [], []

    def run_one(policy, rnd):
        if len(ran) == 4:
            raise KeyboardInterrupt  # the run is cut short in round 2
        ran.append((policy, rnd))
        return {"policy": policy}

    try:
        bench_routing.run_rounds(["a", "b", "c"], 2, run_one, results, lambda: saved.append(len(results)))
    except KeyboardInterrupt:
        pass
    assert ran == [("a", 0), ("b", 0), ("c", 0), ("b", 1)]
    assert saved == [1, 2, 3, 4] and [r["round"] for r in results] == [0, 0, 0, 1]


def test_model_only_prints_the_workload_model_and_starts_nothing(capsys, monkeypatch):
    import ray

    def no_cluster(*a, **k):
        raise AssertionError("--model-only started Ray")
    monkeypatch.setattr(ray, "init", no_cluster)
    assert bench_routing.main(["--model-only", "--replicas", "4", "--conversations", "8", "--turns", "3",
                               "--hidden", "64", "--layers", "1", "--user-words", "32"]) == 0
    out = capsys.readouterr().out
    affinity, random_ = (float(x) for x in re.findall(r"([\d.]+)%", out.splitlines()[-1]))
    assert 0 < random_ < affinity < 100 and "×" in out


@pytest.mark.parametrize("bad", [["--replicas", "0"], ["--turns", "0"], ["--kv-headroom", "0"], ["--kv-blocks", "0"]])
def test_bad_sizes_are_refused_before_anything_starts(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_routing.main(["--model-only", *bad])
    assert exc.value.code == 2 and "must be" in capsys.readouterr().err
