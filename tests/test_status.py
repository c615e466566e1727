"""`llm-cluster status`: the table from a crafted report, Redis checks against a real Redis, and
collect_status on a live local Serve cluster (an LLMReplica-named deployment with a stats() method,
so the Serve side is real whatever engine is behind it), including through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.status import check_redis, collect_status, redact_url, render_table, summarize_redis_routing
from replicas.protocol import ReplicaInfo, ReplicaStats
from tests.fixtures.ray_cluster import free_port

REPO = Path(__file__).resolve().parents[1]


def _stats(rid, **kw):
    base = dict(num_waiting=2, num_running=5, pending_prefill_tokens=480, kv_blocks_total=1000,
                kv_blocks_free=650, kv_usage=0.35, prefix_query_tokens=4000, prefix_hit_tokens=3000,
                num_preemptions=0, replica_id=rid, node_id="n" * 56, tp_size=2, draining=False)
    return {**base, **kw}


CRAFTED = {
    "app": "llm-cluster", "collected_at": "2026-11-21T10:00:00", "status": "RUNNING", "message": "",
    "deployments": {
        "LLMReplica": {"status": "UPSCALING", "message": "", "replica_states": {"RUNNING": 2, "STARTING": 1},
                       "running_replicas": 2, "target_replicas": 3},
        "OpenAIIngress": {"status": "HEALTHY", "message": "", "replica_states": {"RUNNING": 1},
                          "running_replicas": 1, "target_replicas": 1},
    },
    "replicas": [
        {"replica_id": "aaaa1111", "state": "RUNNING", "node_ip": "10.0.0.5", "health": "healthy",
         "stats": _stats("aaaa1111"), "hit_rate": 0.75, "error": None},
        {"replica_id": "bbbb2222", "state": "RUNNING", "node_ip": "10.0.0.6", "health": "draining",
         "stats": _stats("bbbb2222", draining=True, kv_usage=0.9, num_waiting=0), "hit_rate": None, "error": None},
        {"replica_id": "cccc3333", "state": "RUNNING", "node_ip": "10.0.0.7", "health": "no-stats",
         "stats": None, "hit_rate": None, "error": "RayTaskError: engine wedged"},
        {"replica_id": "dddd4444", "state": "STARTING", "node_id": "f00d" * 14, "health": "starting",
         "stats": None, "hit_rate": None, "error": None},
    ],
    "autoscaler": {"enabled": True, "min_replicas": 1, "max_replicas": 4, "target_replicas": 3,
                   "running_replicas": 2, "scaling_status": "UPSCALING",
                   "last_decision": {"prev_num_replicas": 2, "curr_num_replicas": 3, "reason": "queue depth"}},
    "redis": {"url": "redis://:***@redis:6379/0", "reachable": True, "latency_ms": 0.42, "error": None},
}


def test_render_table_from_crafted_report():
    text = render_table(CRAFTED)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("REPLICA"))
    cols = ["REPLICA", "NODE", "TP", "HEALTH", "WAIT/RUN", "PREFILL", "KV USE", "HIT RATE"]
    starts = [header.index(c) for c in cols]
    assert starts == sorted(starts)

    def row(rid):
        line = next(line for line in lines if line.startswith(rid))
        return [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]

    assert row("aaaa1111") == ["aaaa1111", "10.0.0.5", "2", "healthy", "2/5", "480", "35.0%", "75.0%"]
    assert row("bbbb2222") == ["bbbb2222", "10.0.0.6", "2", "draining", "0/5", "480", "90.0%", "-"]
    assert row("cccc3333") == ["cccc3333", "10.0.0.7", "-", "no-stats", "-", "-", "-", "-"]
    assert row("dddd4444")[1:4] == ["f00df00df00d", "-", "starting"]
    assert "  cccc3333: RayTaskError: engine wedged" in lines
    assert any(line.split()[:4] == ["LLMReplica", "UPSCALING", "2/3", "RUNNING=2"] for line in lines)
    assert "autoscaler: on  target=3 running=2 range=[1, 4] UPSCALING  last: 2->3 (queue depth)" in lines
    assert "redis: redis://:***@redis:6379/0  reachable (0.42 ms)" in lines


def test_render_table_autoscaler_off_redis_down_and_errors():
    report = {**CRAFTED, "replicas": [],
              "autoscaler": {"enabled": False, "target_replicas": 2},
              "redis": {"url": "redis://r:6379/0", "reachable": False, "error": "ConnectionError: refused"}}
    lines = render_table(report).splitlines()
    assert "autoscaler: off  replicas=2" in lines
    assert "redis: redis://r:6379/0  UNREACHABLE  ConnectionError: refused" in lines
    assert any(line.startswith("(none)") for line in lines)

    down = render_table({"app": "x", "collected_at": "t", "error": "no Serve application named 'x'"})
    assert down.splitlines()[-1] == "error: no Serve application named 'x'"


def test_render_table_redis_routing_and_json():
    """The ingress replicas' request routers on Redis: the most open breaker (with the mix when they differ),
    lookup failures and fallbacks summed by reason, and the replicas that did not answer."""
    from router.replica_choice import RedisRoutingStats

    rr = summarize_redis_routing([
        RedisRoutingStats(model_id="m", pid=11, replica_id="i1", breaker="open",
                          lookup_failures={"timeout": 2, "breaker_open": 5},
                          fallbacks={"timeout": 2, "breaker_open": 5}),
        RedisRoutingStats(model_id="m", pid=12, replica_id="i2", breaker="closed"),
        {"model_id": "m", "pid": 13, "breaker": None, "lookup_failures": {"error": 1}, "fallbacks": {"error": 1}},
    ], ["RayActorError: the actor died"])
    assert rr["breaker"] == "open" and rr["breaker_states"] == {"open": 1, "closed": 1}
    assert rr["lookup_failures"] == {"timeout": 2, "breaker_open": 5, "error": 1} == rr["fallbacks"]
    assert [r["replica_id"] for r in rr["routers"]] == ["i1", "i2", None]
    report = json.loads(json.dumps({**CRAFTED, "redis_routing": rr}))  # what --json prints
    lines = render_table(report).splitlines()
    assert lines.index("redis: redis://:***@redis:6379/0  reachable (0.42 ms)") == len(lines) - 3
    assert lines[-2] == ("redis routing (3 ingress replicas): breaker=open (1 open, 1 closed)  "
                         "lookup failures=8 (breaker_open=5 error=1 timeout=2)  "
                         "fallbacks=8 (breaker_open=5 error=1 timeout=2)")
    assert lines[-1] == "  OpenAIIngress: RayActorError: the actor died"
    quiet = summarize_redis_routing([RedisRoutingStats(model_id="m", pid=1, breaker="closed")], [])
    assert render_table({**CRAFTED, "redis_routing": quiet}).splitlines()[-1] == \
        "redis routing (1 ingress replica): breaker=closed  lookup failures=0  fallbacks=0"
    assert render_table(CRAFTED).splitlines()[-1].startswith("redis: ")  # a report without the section


def test_redact_url():
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:pw@h:6380") == "rediss://user:***@h:6380"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_check_redis_reachable_and_not(redis_url):
    up = check_redis(redis_url)
    assert up["reachable"] is True and up["latency_ms"] >= 0 and up["error"] is None
    down = check_redis(f"redis://:pw@127.0.0.1:{free_port()}/0", timeout_s=1)
    assert down["reachable"] is False and "Error" in down["error"] and "pw" not in down["url"]


# ---------------------------------------------------------------- live cluster


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


def _run_fake_app(name, redis_url, fail=False, **replica_opts):
    from ray import serve
    replica = serve.deployment(FakeLLMReplica).options(name="LLMReplica", ray_actor_options={"num_cpus": 0},
                                                        **replica_opts)
    ingress = serve.deployment(Ingress).options(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(replica.bind(redis_url, fail)), name=name, route_prefix=f"/{name}", blocking=False)
    deadline = time.monotonic() + 60
    while serve.status().applications[name].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status().applications[name]
        time.sleep(0.2)


@pytest.fixture
def fake_app(ray_cluster, redis_url, monkeypatch):
    from ray import serve
    monkeypatch.delenv("REDIS_URL", raising=False)
    names = []

    def run(name, **kw):
        names.append(name)
        _run_fake_app(name, redis_url, **kw)
        return name
    yield run
    for name in names:
        serve.delete(name)


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
def test_collect_status_on_the_real_app(deploy, redis_url, tiny_model_dir, monkeypatch):
    """The real LLMReplica and ingress on the tiny model: engine stats, prefix hits after a repeated
    prompt, and the Redis URL taken from a replica's config."""
    import httpx

    from cluster.config import load_config

    monkeypatch.delenv("REDIS_URL", raising=False)
    cfg = load_config(overrides={
        "engine.model": str(tiny_model_dir), "engine.device": "cpu", "engine.num_kv_blocks": 128,
        "replicas.num_replicas": 2, "replicas.num_cpus": 0.5, "redis_url": redis_url, "router.policy": "prefix"},
        env={})
    base = deploy(cfg, name="status-real")
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
