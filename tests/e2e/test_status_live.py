"""`llm-cluster status` on a live local Serve cluster: collect_status against an LLMReplica-named deployment
with a stats() method (so the Serve side is real whatever engine is behind it), through the CLI from another
process, and on the real app with the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.ports import free_port
from cluster.status import collect_status, render_table
from replicas.protocol import ReplicaInfo, ReplicaStats
from tests.cluster.test_status import _stats
from tests.fixtures.configs import serve_config

REPO = Path(__file__).resolve().parents[2]


class FakeLLMReplica:
    """Answers what the real LLMReplica answers to `status`, from fixed numbers (no engine)."""

    def __init__(self, redis_url, fail=False):
        from ray import serve
        self.rid = serve.get_replica_context().replica_id.unique_id
        self.redis_url, self.fail = redis_url, fail

    async def stats(self):
        if self.fail:
            raise RuntimeError("engine wedged")
        import ray
        return ReplicaStats(**_stats(self.rid, tp_size=1, node_id=ray.get_runtime_context().get_node_id()),
                            computed_tokens=0, steps=0, last_step_unix=None, pid=os.getpid(), torch_threads=1)

    async def model_info(self):
        return ReplicaInfo(model_id="fake", max_model_len=128, block_size=16, model_path="/fake",
                           replica_id=self.rid, redis_url=self.redis_url)


class Ingress:
    def __init__(self, replicas):
        self.replicas = replicas
        self.routed = False

    async def __call__(self, request):
        return "ok"

    async def redis_routing(self):
        """As OpenAIIngress answers it, after the real request router of this process routed two requests
        against a Redis that refuses connections: one failed lookup, then one skipped by the open breaker."""
        from ray import serve

        from replicas.engine.protocol import GenerationRequest
        from router.replica_choice import ReplicaChooser, RoutingParams, redis_routing_stats
        if not self.routed:
            self.routed = True
            self.chooser = ReplicaChooser(RoutingParams(
                model_id="fake", policy="prefix", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                redis_timeout_ms=2000, redis_breaker_s=600))
            for k in range(2):
                await self.chooser.choose(["r1", "r2"], [None, None],
                                          GenerationRequest(request_id=f"q{k}", prompt_token_ids=list(range(40))))
        return redis_routing_stats("fake").model_copy(
            update={"replica_id": serve.get_replica_context().replica_id.unique_id})


def _fake_application(redis_url, fail=False, **replica_opts):
    from ray import serve
    replica = serve.deployment(FakeLLMReplica).options(name="LLMReplica", ray_actor_options={"num_cpus": 0},
                                                        **replica_opts)
    ingress = serve.deployment(Ingress).options(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(redis_url, fail))


@pytest.fixture
def fake_app(serve_app, redis_url, monkeypatch):
    """fake_app(name, fail=..., **replica options) -> name: the fake app served at /name until the test ends."""
    from ray import serve
    monkeypatch.delenv("REDIS_URL", raising=False)
    apps = []

    def run(name, **kw):
        apps.append(serve_app.run(_fake_application(redis_url, **kw), name, f"/{name}", wait_s=60, interval=0.2,
                                  ready=lambda: serve.status().applications[name].status == "RUNNING"))
        return name
    yield run
    for app in apps:
        app.delete()


@pytest.mark.ray
def test_collect_status_live(fake_app, redis_url):
    app = fake_app("status-live", autoscaling_config={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 2})
    report = collect_status(app_name=app)
    assert report["status"] == "RUNNING" and "error" not in report
    d = report["deployments"]["LLMReplica"]
    assert d["status"] == "HEALTHY" and d["running_replicas"] == 2
    assert len(report["replicas"]) == 2
    for r in report["replicas"]:
        assert r["state"] == "RUNNING" and r["health"] == "healthy" and r["pid"] > 0
        assert r["stats"]["replica_id"] == r["replica_id"] and r["hit_rate"] == 0.75
    assert report["autoscaler"]["enabled"] and report["autoscaler"]["max_replicas"] == 3
    assert report["autoscaler"]["target_replicas"] == 2
    # redis_url came from a replica's model_info() (nothing passed, no REDIS_URL)
    assert report["redis"]["reachable"] is True and report["redis"]["url"] == redis_url
    rr = report["redis_routing"]  # from the ingress replica's request router (Redis refused there)
    assert rr["errors"] == [] and rr["breaker"] == "open" and rr["breaker_states"] == {"open": 1}
    assert rr["lookup_failures"] == {"error": 1, "breaker_open": 1} == rr["fallbacks"]
    [router] = rr["routers"]
    assert router["model_id"] == "fake" and router["pid"] > 0 and router["replica_id"]
    table = render_table(report)
    assert sum(" healthy " in line for line in table.splitlines()) == 2
    assert ("redis routing (1 ingress replica): breaker=open  lookup failures=2 (breaker_open=1 error=1)  "
            "fallbacks=2 (breaker_open=1 error=1)") in table.splitlines()

    unknown = collect_status(app_name="no-such-app")
    assert unknown["error"] == "no Serve application named 'no-such-app'"


@pytest.mark.ray
def test_collect_status_replica_without_stats(fake_app):
    app = fake_app("status-fail", fail=True, num_replicas=1)
    report = collect_status(app_name=app, redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=5)
    [r] = report["replicas"]
    assert r["health"] == "no-stats" and "engine wedged" in r["error"]
    assert report["redis"]["reachable"] is False


@pytest.mark.ray
def test_cli_status_json_from_another_process(fake_app, redis_url):
    import ray
    app = fake_app("status-cli", num_replicas=1)
    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", gcs, "--app", app,
                          "--redis-url", redis_url, "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["status"] == "RUNNING" and [r["health"] for r in report["replicas"]] == ["healthy"]
    assert report["redis"]["reachable"] is True
    assert report["redis_routing"]["breaker"] == "open" and report["redis_routing"]["fallbacks"]["error"] == 1


@pytest.mark.slow
@pytest.mark.ray
def test_collect_status_on_the_real_app(serve_app, redis_url, tiny_model_dir, monkeypatch):
    """The real LLMReplica and ingress on the tiny model: engine stats, prefix hits after a repeated
    prompt, and the Redis URL taken from a replica's config."""
    import httpx

    monkeypatch.delenv("REDIS_URL", raising=False)
    cfg = serve_config(tiny_model_dir, {"engine.num_kv_blocks": 128, "replicas.num_replicas": 2,
                                        "redis_url": redis_url, "router.policy": "prefix"})
    with serve_app(cfg, name="status-real") as app:
        base = app.base
        prompt = list(range(10, 10 + 48))
        for _ in range(3):  # the same 3-block prompt: later ones hit the prefix cache of the replica they reach
            r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0},
                           timeout=60)
            assert r.status_code == 200, r.text
            time.sleep(0.3)  # block events reach Redis, so the prefix router prefers the holder
        report = collect_status(app_name="status-real")
        assert report["status"] == "RUNNING"
        assert {name: d["running_replicas"] for name, d in report["deployments"].items()} == {
            "LLMReplica": 2, "OpenAIIngress": 1}
        assert [r["health"] for r in report["replicas"]] == ["healthy", "healthy"]
        stats = [r["stats"] for r in report["replicas"]]
        assert all(s["kv_blocks_total"] == 128 and s["tp_size"] == 1 for s in stats)
        assert sum(s["prefix_query_tokens"] for s in stats) >= 3 * 48
        assert sum(s["prefix_hit_tokens"] for s in stats) >= 32, stats  # at least 2 full blocks found cached
        assert any(r["hit_rate"] for r in report["replicas"])
        assert report["redis"] == {"url": redis_url, "reachable": True, "latency_ms": report["redis"]["latency_ms"],
                                   "error": None}
        rr = report["redis_routing"]  # the real OpenAIIngress's request router, which has opened the index
        assert rr["errors"] == [] and len(rr["routers"]) == 1 and rr["breaker"] in ("closed", "half_open", "open")
        print(render_table(report))
