"""The soak step (load_tests/soak.py): its pieces without a cluster (process roles, the RSS flat check,
error classes, the request mix). The one-minute soak on a real local cluster: tests/e2e/test_load_soak_run.py."""
from __future__ import annotations

import random

import numpy as np
import pytest

from load_tests.soak import (
    DOCUMENTED,
    RequestRecord,
    SoakConfig,
    error_counts,
    plan_request,
    process_role,
    rss_flat_check,
)


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
