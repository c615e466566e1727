"""`llm-cluster status`: the table from a crafted report and Redis checks against a real Redis (collect_status
on a live local Serve cluster: tests/e2e/test_status_live.py)."""
from __future__ import annotations

import json

from cluster.ports import free_port
from cluster.status import check_redis, redact_url, render_table, summarize_redis_routing


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
