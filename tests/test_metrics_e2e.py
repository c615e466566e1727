"""Metrics and x-replica-id end to end on a real local Ray Serve cluster: 2 tiny-model replicas (autoscaling
pinned at 2, so the policy runs in the controller), a Redis URL nobody listens on (the replicas' KV publishers
fail), one slot per engine (a second stream on a replica waits).

- the router's GET /metrics shows the request, latency and token metrics with non-zero values;
- Ray's metrics export (the node's metrics agent) shows the replica-side metrics (KV usage, waiting, running,
  prefix-cache query/hit tokens), the publisher's Redis fallbacks and the autoscaling gauges;
- every response's x-replica-id names one of the running replicas.
"""
from __future__ import annotations

import asyncio
import time
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.app import REPLICA_DEPLOYMENT, build_app_from_config
from cluster.config import load_config
from replicas.protocol import ReplicaStats
from tests.fixtures.ray_cluster import _wait_ready, free_port

pytestmark = [pytest.mark.ray]

APP = "metrics-e2e"
N_REPLICAS = 2
PROMPT = list(range(20, 60))  # 40 tokens: 2 full blocks of 16


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model_dir):
    from ray import serve

    cfg = load_config(env={}, overrides={
        "engine.model": str(tiny_model_dir), "engine.model_id": "tiny", "engine.device": "cpu",
        "engine.num_kv_blocks": 96, "engine.max_model_len": 512, "engine.max_num_seqs": 1,
        "replicas.num_cpus": 0.5, "router.policy": "pow2", "redis_url": f"redis://127.0.0.1:{free_port()}",
        "autoscaling.enabled": True, "autoscaling.min_replicas": N_REPLICAS, "autoscaling.max_replicas": N_REPLICAS})
    serve.run(build_app_from_config(cfg), name=APP, route_prefix="/", blocking=False)
    try:
        _wait_ready(ray_cluster, 180)
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP)
        deadline = time.monotonic() + 120
        while len(replica_ids(handle)) < N_REPLICAS:
            assert time.monotonic() < deadline, "replicas did not all come up"
            time.sleep(0.5)
        yield ray_cluster, handle
    finally:
        serve.delete(APP)


def replica_ids(handle) -> set[str]:
    results = handle.broadcast("stats").results(timeout_s=10, return_exceptions=True)
    return {s.replica_id for s in results if isinstance(s, ReplicaStats)}


def samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(parsed, name: str, agg=sum, **labels) -> float:
    values = [v for n, lab, v in parsed if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return agg(values) if values else 0.0


def ray_export() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_replica_id_header_names_a_running_replica(cluster):
    base, handle = cluster
    ids = replica_ids(handle)
    assert len(ids) == N_REPLICAS
    for stream in (False, True, False, True):
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3, "stream": stream}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            r.read()
            assert r.status_code == 200, r.text
            assert r.headers["x-replica-id"] in ids, (r.headers.get("x-replica-id"), ids)


async def test_router_and_ray_export_show_the_named_metrics(cluster):
    base, handle = cluster
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        # The same 2-block prompt 4 times over 2 replicas: one of them serves it twice (a prefix hit).
        for _ in range(4):
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                                         "ignore_eos": True})
            assert r.status_code == 200, r.text
        router = samples((await http.get("/metrics")).text)
        m = {"model": "tiny"}
        assert total(router, "llmc_requests_total", status="ok", **m) >= 4
        for name in ("llmc_time_to_first_token_seconds_count", "llmc_inter_token_latency_seconds_count",
                     "llmc_e2e_request_latency_seconds_count"):
            assert total(router, name, **m) >= 4, name
        assert total(router, "llmc_e2e_request_latency_seconds_sum", **m) > 0
        assert total(router, "llmc_prompt_tokens_total", **m) >= 4 * len(PROMPT)
        assert total(router, "llmc_generation_tokens_total", **m) >= 16

        # Engines busy when the metrics agent samples (every 10 s by default): 3 long streams, 50 ms per step,
        # one slot per engine, so one replica runs one and queues another.
        await asyncio.to_thread(lambda: handle.broadcast("_inject_fault", "slow").results(timeout_s=10))
        started = asyncio.Event()

        async def long_stream():
            body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                async for _ in resp.aiter_lines():
                    started.set()

        streams = [asyncio.create_task(long_stream()) for _ in range(3)]
        try:
            await asyncio.wait_for(started.wait(), 60)
            want = {
                "ray_llmc_kv_cache_usage_ratio": max, "ray_llmc_num_requests_running": sum,
                "ray_llmc_prefix_cache_query_tokens_total": sum,
                "ray_llmc_prefix_cache_hit_tokens_total": sum,
            }
            deadline = time.monotonic() + 60
            while True:
                ray_side = samples(await asyncio.to_thread(ray_export))
                got = {name: total(ray_side, name, agg, model="tiny") for name, agg in want.items()}
                got["publisher fallbacks"] = total(ray_side, "ray_llmc_redis_fallbacks_total", component="publisher")
                for g in ("desired", "actual"):
                    got[g] = total(ray_side, f"ray_llmc_autoscaling_{g}_replicas", max, deployment=REPLICA_DEPLOYMENT)
                if all(got.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
        finally:
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    # Counters only grow: after the requests above they must be non-zero. Gauges (KV usage, running,
    # waiting, autoscaling desired/actual) are sampled by the metrics agent every few seconds, so
    # whether a sample catches the streams mid-flight depends on machine load: they must be exported
    # (per replica / per deployment), and non-zero values are asserted where the timing is ours.
    counters = ("ray_llmc_prefix_cache_query_tokens_total", "ray_llmc_prefix_cache_hit_tokens_total",
                "publisher fallbacks")
    assert all(got[c] > 0 for c in counters), got
    assert got["ray_llmc_prefix_cache_hit_tokens_total"] >= 16  # at least one full block found cached
    exported = {n for n, _, _ in ray_side}
    for gauge in ("ray_llmc_kv_cache_usage_ratio", "ray_llmc_num_requests_running", "ray_llmc_num_requests_waiting",
                  "ray_llmc_autoscaling_desired_replicas", "ray_llmc_autoscaling_actual_replicas"):
        assert gauge in exported, gauge
    waiting = [lab["replica"] for n, lab, _ in ray_side if n == "ray_llmc_num_requests_waiting"]
    assert len(set(waiting)) == N_REPLICAS, waiting
    assert 0 <= got["ray_llmc_kv_cache_usage_ratio"] <= 1
    # Per replica, labelled with the ids the replicas report.
    replicas = {lab["replica"] for n, lab, _ in ray_side if n == "ray_llmc_num_requests_running"}
    assert await asyncio.to_thread(replica_ids, handle) <= replicas
