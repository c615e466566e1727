"""Metrics and x-replica-id end to end on a real local Ray Serve cluster: 2 tiny-model replicas (autoscaling
pinned at 2, so the policy runs in the controller), a Redis URL nobody listens on (the replicas' KV publishers
fail), one slot per engine (a second stream on a replica waits).

- the router's GET /metrics shows the request, latency and token metrics with non-zero values;
- Ray's metrics export (the node's metrics agent) shows the replica-side metrics (KV usage, waiting, running,
  prefix-cache query/hit tokens), the publisher's Redis fallbacks and the autoscaling gauges;
- every response's x-replica-id names one of the running replicas;
- every catalogue metric, recorded through ray.util.metrics, is exported under the names `exported_names`
  promises (a Ray instance of its own, in a subprocess).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.app import REPLICA_DEPLOYMENT
from cluster.ports import free_port
from replicas.metrics import CATALOGUE, exported_names
from tests.fixtures.configs import serve_config
from tests.fixtures.wait import wait_until_async

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray]

APP = "metrics-e2e"
N_REPLICAS = 2
PROMPT = list(range(20, 60))  # 40 tokens: 2 full blocks of 16


@pytest.fixture(scope="module")
def cluster(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 96, "engine.max_model_len": 512, "engine.max_num_seqs": 1,
        "redis_url": f"redis://127.0.0.1:{free_port()}", "autoscaling.enabled": True,
        "autoscaling.min_replicas": N_REPLICAS, "autoscaling.max_replicas": N_REPLICAS}), name=APP, replicas=N_REPLICAS)
    return app


def replica_ids(app) -> set[str]:
    """The ids of the replicas that answer stats()."""
    return set(app.replica_stats())


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
    base = cluster.base
    ids = replica_ids(cluster)
    assert len(ids) == N_REPLICAS
    for stream in (False, True, False, True):
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3, "stream": stream}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            r.read()
            assert r.status_code == 200, r.text
            assert r.headers["x-replica-id"] in ids, (r.headers.get("x-replica-id"), ids)


async def test_router_and_ray_export_show_the_named_metrics(cluster):
    base, handle = cluster.base, cluster.handle
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

            async def scrape():
                ray_side = samples(await asyncio.to_thread(ray_export))
                got = {name: total(ray_side, name, agg, model="tiny") for name, agg in want.items()}
                got["publisher fallbacks"] = total(ray_side, "ray_llmc_redis_fallbacks_total", component="publisher")
                for g in ("desired", "actual"):
                    got[g] = total(ray_side, f"ray_llmc_autoscaling_{g}_replicas", max, deployment=REPLICA_DEPLOYMENT)
                return ray_side, got

            # Every figure non-zero, or what the export shows after 60 s (asserted below, weaker for gauges).
            ray_side, got = await wait_until_async(scrape, 60, 1.0, until=lambda r: all(r[1].values()), check=False)
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
    assert await asyncio.to_thread(replica_ids, cluster) <= replicas


def test_ray_export_names_match_exported_names(tmp_path):
    """Every catalogue metric, recorded through ray.util.metrics in a Ray actor, shows up on the node's
    metrics export port under the names `exported_names` promises (the Grafana dashboard's names)."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, sys, urllib.request
        import ray
        from tests.fixtures.wait import wait_until
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 300})
        try:
            @ray.remote(num_cpus=0)
            class Recorder:
                def record(self):
                    from replicas.metrics import MetricsRecorder
                    from tests.serving.test_metrics import _record_every_metric
                    self.rec = MetricsRecorder()
                    _record_every_metric(self.rec)
            actor = Recorder.remote()
            ray.get(actor.record.remote())
            port = ray.nodes()[0]["MetricsExportPort"]
            want = set(json.loads(sys.argv[1]))

            def exported():
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_llmc_")}
            seen = wait_until(exported, 60, 0.5, until=lambda seen: want <= seen, check=False)
            print("SEEN " + json.dumps(sorted(seen)))
        finally:
            ray.shutdown()
    """))
    want = sorted(n for spec in CATALOGUE.values() for n in exported_names(spec))
    # A fresh Ray instance of its own (faster metrics reporting than the shared test cluster's).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(script), json.dumps(want)], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env=env)
    seen_line = [line for line in out.stdout.splitlines() if line.startswith("SEEN ")]
    assert seen_line, out.stdout[-2000:] + out.stderr[-3000:]
    seen = set(json.loads(seen_line[0][5:]))
    assert set(want) <= seen, sorted(set(want) - seen)
