"""The soak step (load_tests/soak.py): its pieces without a cluster (process roles, the RSS flat check,
error classes, the request mix), and a one-minute soak on a real local cluster of two tiny-model replicas
with one replica SIGKILLed at 15 s and Redis SIGKILLed at 30 s (restarted at 42 s), run as the command
line runs it, in its own process so that it owns its Ray instance."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from load_tests.soak import (
    DOCUMENTED,
    REQUIRED_ROLES,
    RequestRecord,
    SoakConfig,
    error_counts,
    plan_request,
    process_role,
    rss_flat_check,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmdline,name,role", [
    (["/x/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp"], "gcs_server", "gcs"),
    (["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=s"], "raylet", "raylet"),
    (["redis-server 127.0.0.1:5000"], "redis-server", "redis"),
    (["ray::ServeController.listen_for_change"], "ray::ServeCont", "serve_controller"),
    (["ray::ProxyActor"], "ray::ProxyActor", "proxy"),
    (["ray::ServeReplica:llm-cluster:LLMReplica"], "ray::ServeReplica", "replica"),
    (["ray::ServeReplica:llm-cluster:LLMReplica.handle_request_streaming"], "ray::ServeReplica", "replica"),
    (["ray::ServeReplica:llm-cluster:OpenAIIngress"], "ray::ServeReplica", "ingress"),
    (["ray::IDLE"], "ray::IDLE", "idle_worker"),
    (["python", "/x/ray/dashboard/dashboard.py", "--host=127.0.0.1"], "python", "dashboard"),
    (["python", "-u", "/x/ray/_private/log_monitor.py"], "python", "log_monitor"),
    (["sleep", "5"], "sleep", "other"),
])
def test_process_roles(cmdline, name, role):
    assert process_role(cmdline, name, pid=2, driver_pid=1) == role
    assert process_role(cmdline, name, pid=1, driver_pid=1) == "driver"


def _proc(role, t, rss):
    return {"role": role, "name": role, "t": list(t), "rss": list(rss)}


def test_rss_flat_check_judges_long_lived_processes_against_their_level_after_warm_up():
    t = [float(i) for i in range(0, 101)]
    procs = {
        1: _proc("raylet", t, [50 if x < 20 else 100 for x in t]),  # grew during warm-up only: flat
        2: _proc("gcs", t, [100 + x for x in t]),  # grows all along: +~60% from its level after warm-up
        3: _proc("replica", t[:40], [100] * 40),  # killed at 39 s: too short after warm-up to judge
        4: _proc("replica", t[40:], [100] * 61),  # replacement: own warm-up (40 + 10), then judged
        5: _proc("idle_worker", t, [100 + 5 * x for x in t]),  # never judged
    }
    r = rss_flat_check(procs, warmup_s=20, process_warmup_s=10, window_s=10, tolerance=0.10, end_s=100,
                       interval_s=1)
    rows = {row["pid"]: row for row in r["processes"]}
    assert rows[1]["judged"] and rows[1]["flat"] and rows[1]["change"] == 0
    assert rows[2]["judged"] and not rows[2]["flat"] and rows[2]["change"] > 0.5
    assert not rows[3]["judged"] and not rows[3]["alive_at_end"]
    assert rows[4]["judged"] and rows[4]["flat"] and rows[4]["alive_at_end"]
    assert not rows[5]["judged"]
    assert r["judged"] == 3 and not r["flat"] and r["not_flat"] == [f"gcs 2: {rows[2]['change']:+.1%}"]
    del procs[2]
    assert rss_flat_check(procs, warmup_s=20, process_warmup_s=10, window_s=10, tolerance=0.10, end_s=100,
                          interval_s=1)["flat"]


def test_error_counts_keep_documented_errors_apart_and_cancellations_out():
    base = dict(t_s=0, kind="chat", stream=True, planned_cancel=False, max_tokens=8)
    recs = [RequestRecord(**base), RequestRecord(**base, outcome="cancelled")]
    for kind, code in (("http_503", "no_healthy_replica"), ("stream_error", "no_healthy_replica"),
                       ("http_500", "internal_error"), ("incomplete", None), ("wrong_length", None)):
        r = RequestRecord(**base)
        r.fail(kind, code, "x")
        r.fail("later", None, "the first cause wins")
        recs.append(r)
    e = error_counts(recs)
    assert e["documented"] == {"http_503:no_healthy_replica": 1, "stream_error:no_healthy_replica": 1}
    assert e["undocumented"] == {"http_500:internal_error": 1, "incomplete": 1, "wrong_length": 1}
    assert set(e["documented"]) <= set(DOCUMENTED)


def test_request_mix_covers_chat_completions_streams_and_cancellations():
    cfg = SoakConfig(minutes=1, cancel_share=0.5)
    rng, nrng = random.Random(0), np.random.default_rng(0)
    plans = [plan_request(rng, nrng, cfg, "m") for _ in range(200)]
    kinds = {(p.kind, p.stream) for p in plans}
    assert kinds == {("chat", True), ("chat", False), ("completion", True), ("completion", False)}
    assert any(p.cancel_after for p in plans) and all(p.stream for p in plans if p.cancel_after)
    for p in plans:
        assert p.body["ignore_eos"] and cfg.min_tokens <= p.max_tokens <= cfg.max_tokens
        assert p.cancel_after is None or 1 <= p.cancel_after < p.max_tokens
        assert ("messages" in p.body) == (p.kind == "chat") and p.body["stream"] == p.stream


def test_schedule_defaults():
    cfg = SoakConfig(minutes=20)
    assert cfg.kill_times() == [240, 480, 720, 960]
    assert cfg.redis_kill_time() == 360 and cfg.warmup() == 300 and cfg.window() == 60
    short = SoakConfig(minutes=1, kill_at_s=[15, 90])
    assert short.kill_times() == [15] and short.redis_kill_time() == 30


@pytest.mark.slow
@pytest.mark.ray
def test_one_minute_soak_with_a_replica_kill_and_a_redis_kill(tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "load_tests", "soak", "--minutes", "1", "--model", "tiny", "--out", str(out),
           "--kill-at", "15", "--redis-kill-at", "30", "--redis-down-s", "12", "--warmup-s", "10",
           "--sample-every-s", "1", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert (out / "results.json").exists(), proc.stderr[-4000:]
    r = json.loads((out / "results.json").read_text())
    req, v = r["requests"], r["verdict"]

    assert req["sent"] >= 20 and req["ok"] >= 10, req
    assert req["undocumented_errors"] == {}, (req["undocumented_errors"], req["error_examples"])
    assert v["no_undocumented_errors"] and req["cancelled_by_client"] > 0
    assert set(req["by_mix"]) == {"chat", "chat stream", "completion", "completion stream"}

    kill = r["replica_kills"][0]
    assert len(r["replica_kills"]) == 1 and 15 <= kill["t_s"] < 25 and kill["pid"], r["replica_kills"]
    assert kill.get("replacement_s") is not None and kill["replacement_pid"] != kill["pid"]
    assert [e["event"] for e in r["events"]] == ["kill_replica", "kill_redis", "restart_redis"]
    assert r["redis"]["while_down"]["ok"] > 0 and not r["redis"]["while_down"]["errors"], r["redis"]

    assert v["kv_idle"], r["kv_end"]
    assert len(r["kv_end"]["replicas"]) == 2
    for s in r["kv_end"]["replicas"].values():
        assert s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]

    roles = r["processes_by_role"]
    assert all(roles.get(role) for role in REQUIRED_ROLES), roles
    assert roles["replica"] >= 3 and roles["redis"] >= 2  # the replacement and the restarted Redis are new processes
    rss = json.loads((out / "rss.json").read_text())["processes"]
    killed = rss[str(kill["pid"])]
    assert killed["role"] == "replica" and killed["t_s"][-1] < kill["t_s"] + 5  # its series ends at the kill
    for p in rss.values():
        assert len(p["t_s"]) == len(p["rss_mib"]) >= 1 and all(x > 0 for x in p["rss_mib"])
    assert any(row["judged"] for row in r["rss"]["processes"])

    assert imread(out / "soak.png").shape[0] > 500
    assert "# soak" in (out / "results.md").read_text()
    assert sum(1 for _ in open(out / "requests.jsonl")) == req["sent"]
