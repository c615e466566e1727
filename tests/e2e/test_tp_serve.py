"""Tensor-parallel replicas through Serve on the session Ray cluster (engine.tp_size=2 on CPU, gloo): each
replica is a placement group of the replica actor (rank 0) and one TPWorker actor (rank 1).

- requests work end to end and equal the tp_size=1 engine's greedy output;
- a worker killed mid-stream: the stream fails over and completes unbroken, the replica exits within the
  health period, Serve replaces it, and no worker of the old replica is left;
- a worker killed under an idle replica: the health check's ping finds it, and the replica is replaced;
- a replica actor killed: its worker goes with it;
- deleting the app stops every worker.
"""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from cluster.app import REPLICA_DEPLOYMENT
from replicas.tp_worker import TP_NAMESPACE
from tests.fixtures.configs import serve_config
from tests.fixtures.engine import greedy, make_engine, request, run_all, text_of
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(240)]

APP = "tp-test"
N_REPLICAS = 2
HEALTH_PERIOD_S = 1.0
PROMPT = [17, 42, 99, 256, 311, 7, 88, 140, 201, 5]


@pytest.fixture(scope="module")
def tp_app(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.tp_size": 2, "engine.num_kv_blocks": 256, "engine.block_size": 16,
        "replicas.num_replicas": N_REPLICAS, "replicas.health_check_period_s": HEALTH_PERIOD_S,
        # A shared 2-core box: leave the worker ping time to answer (probe timeout = half of this).
        "replicas.health_check_timeout_s": 4, "replicas.graceful_shutdown_timeout_s": 2}), name=APP)
    wait_until(lambda: len(app.replica_stats()) == N_REPLICAS, 120, 0.2, "all replicas up")
    return app


def named_actors() -> tuple[set[str], set[str]]:
    """(live LLMReplica replica ids of this app, live TP worker actor names)."""
    import ray

    replicas, workers = set(), set()
    prefix = f"SERVE_REPLICA::{APP}#{REPLICA_DEPLOYMENT}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == TP_NAMESPACE:
            workers.add(a["name"])
        elif a["name"].startswith(prefix):
            replicas.add(a["name"][len(prefix):])
    return replicas, workers


def worker_name(replica_id: str) -> str:
    return f"{replica_id}/tp1"


def actor_pid(actor) -> int:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)


def pid_alive(pid: int) -> bool:
    """A running process (an exited one its parent has not reaped yet, a zombie, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _steady(app) -> dict[str, dict]:
    """Wait until N_REPLICAS replicas serve, each with exactly its own worker and no other worker alive."""
    def ok():
        stats = app.replica_stats()
        replicas, workers = named_actors()
        return stats if (len(stats) == N_REPLICAS and set(stats) == replicas
                         and workers == {worker_name(r) for r in stats}) else None
    return wait_until(ok, 120, 0.5, lambda: f"{N_REPLICAS} replicas with one worker each: {named_actors()}")


def _complete(base: str, max_tokens: int) -> str:
    r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def tp1_text(tiny_model_dir):
    """The tp_size=1 engine's greedy text for PROMPT (the reference), by max_tokens."""
    engine = make_engine(tiny_model_dir)
    return lambda n: text_of(run_all(engine, [request("ref", PROMPT, greedy(n))])["ref"])


def test_tp_replicas_serve_like_tp1(tp_app, tp1_text):
    base = tp_app.base
    stats = _steady(tp_app)
    assert all(s["tp_size"] == 2 for s in stats.values())
    for _ in range(3):  # pow2 over two replicas: both serve some of them
        assert _complete(base, 12) == tp1_text(12)


def test_killed_worker_fails_over_and_replica_is_replaced(tp_app, tp1_text):
    import ray

    base = tp_app.base
    before = _steady(tp_app)
    n_tokens = 80
    text, victim, t_kill = "", None, None
    with httpx.stream("POST", base + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += event["choices"][0]["text"]
            if victim is None:  # mid-stream: kill the worker of the replica serving it
                victim = next(rid for rid, s in tp_app.replica_stats().items() if s["num_running"])
                ray.kill(ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE))
                t_kill = time.monotonic()
    assert victim is not None
    assert text == tp1_text(n_tokens)  # one unbroken stream: nothing repeated, nothing missing
    # The replica notices on its next health check and exits (a step in flight also fails at once).
    wait_until(lambda: victim not in named_actors()[0], 30, 0.05, "the replica with a dead worker to exit")
    print(f"replica gone {time.monotonic() - t_kill:.2f}s after its worker was killed "
          f"(health period {HEALTH_PERIOD_S}s)")
    assert time.monotonic() - t_kill < HEALTH_PERIOD_S + 10  # + the health call and exit on a loaded box
    after = _steady(tp_app)
    assert victim not in after and len(set(after) - set(before)) == 1
    assert _complete(base, 12) == tp1_text(12)


def test_idle_replica_with_a_dead_worker_is_replaced(tp_app, tp1_text):
    """No step notices an idle replica's dead worker: the health check's worker ping does."""
    import ray

    base = tp_app.base
    before = _steady(tp_app)
    victim = next(iter(before))
    ray.kill(ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE))
    t_kill = time.monotonic()
    wait_until(lambda: victim not in named_actors()[0], 30, 0.05, "the replica with a dead worker to exit")
    print(f"idle replica gone {time.monotonic() - t_kill:.2f}s after its worker was killed")
    assert time.monotonic() - t_kill < HEALTH_PERIOD_S + 10
    assert victim not in _steady(tp_app)
    assert _complete(base, 12) == tp1_text(12)


def test_killed_replica_takes_its_worker_along(tp_app):
    import ray

    stats = _steady(tp_app)
    victim, s = next(iter(stats.items()))
    worker = ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE)
    worker_pid = actor_pid(worker)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA_DEPLOYMENT}#{victim}", namespace="serve"))
    # Workers are the replica actor's children: Ray ends them with it (no orphaned rank or process group).
    wait_until(lambda: worker_name(victim) not in named_actors()[1] and not pid_alive(worker_pid)
               and not pid_alive(s["pid"]), 30, 0.2, "the dead replica's worker to end")
    after = _steady(tp_app)
    assert victim not in after


def test_deleting_the_app_stops_every_worker(tp_app):
    stats = _steady(tp_app)
    pids = [actor_pid(__import__("ray").get_actor(worker_name(r), namespace=TP_NAMESPACE)) for r in stats]
    tp_app.delete()
    wait_until(lambda: not named_actors()[1] and not any(map(pid_alive, pids)), 60, 0.2,
               "every TP worker to end with the app")
