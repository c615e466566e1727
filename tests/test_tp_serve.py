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

from cluster.app import REPLICA_DEPLOYMENT, build_app_from_config
from cluster.config import load_config
from replicas.protocol import ReplicaStats
from replicas.tp_worker import TP_NAMESPACE
from tests.engine_utils import greedy, make_engine, request, run_all, text_of
from tests.fixtures.ray_cluster import _wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(240)]

APP = "tp-test"
N_REPLICAS = 2
HEALTH_PERIOD_S = 1.0
PROMPT = [17, 42, 99, 256, 311, 7, 88, 140, 201, 5]


@pytest.fixture(scope="module")
def tp_app(ray_cluster, tiny_model_dir):
    from ray import serve

    cfg = load_config(overrides={
        "engine.model": str(tiny_model_dir), "engine.device": "cpu", "engine.tp_size": 2,
        "engine.num_kv_blocks": 256, "engine.block_size": 16, "replicas.num_replicas": N_REPLICAS,
        "replicas.num_cpus": 0.5, "replicas.health_check_period_s": HEALTH_PERIOD_S,
        # A shared 2-core box: leave the worker ping time to answer (probe timeout = half of this).
        "replicas.health_check_timeout_s": 4, "replicas.graceful_shutdown_timeout_s": 2, "router.policy": "pow2"})
    serve.run(build_app_from_config(cfg), name=APP, route_prefix="/", blocking=False)
    try:
        _wait_ready(ray_cluster, 180)
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP)
        _wait_for(lambda: len(replica_stats(handle)) == N_REPLICAS, 120, "replicas did not all come up")
        yield ray_cluster, handle
    finally:
        serve.delete(APP)


def replica_stats(handle) -> dict[str, dict]:
    results = handle.broadcast("stats").results(timeout_s=10, return_exceptions=True)
    return {s.replica_id: s.model_dump() for s in results if isinstance(s, ReplicaStats)}


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


def _wait_for(cond, timeout_s: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(interval)


def _steady(handle) -> dict[str, dict]:
    """Wait until N_REPLICAS replicas serve, each with exactly its own worker and no other worker alive."""
    def ok():
        stats = replica_stats(handle)
        replicas, workers = named_actors()
        return stats if (len(stats) == N_REPLICAS and set(stats) == replicas
                         and workers == {worker_name(r) for r in stats}) else None
    return _wait_for(ok, 120, f"not {N_REPLICAS} replicas with one worker each: {named_actors()}", 0.5)


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
    base, handle = tp_app
    stats = _steady(handle)
    assert all(s["tp_size"] == 2 for s in stats.values())
    for _ in range(3):  # pow2 over two replicas: both serve some of them
        assert _complete(base, 12) == tp1_text(12)


def test_killed_worker_fails_over_and_replica_is_replaced(tp_app, tp1_text):
    import ray

    base, handle = tp_app
    before = _steady(handle)
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
                victim = next(rid for rid, s in replica_stats(handle).items() if s["num_running"])
                ray.kill(ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE))
                t_kill = time.monotonic()
    assert victim is not None
    assert text == tp1_text(n_tokens)  # one unbroken stream: nothing repeated, nothing missing
    # The replica notices on its next health check and exits (a step in flight also fails at once).
    _wait_for(lambda: victim not in named_actors()[0], 30, "the replica with a dead worker is still up", 0.05)
    print(f"replica gone {time.monotonic() - t_kill:.2f}s after its worker was killed "
          f"(health period {HEALTH_PERIOD_S}s)")
    assert time.monotonic() - t_kill < HEALTH_PERIOD_S + 10  # + the health call and exit on a loaded box
    after = _steady(handle)
    assert victim not in after and len(set(after) - set(before)) == 1
    assert _complete(base, 12) == tp1_text(12)


def test_idle_replica_with_a_dead_worker_is_replaced(tp_app, tp1_text):
    """No step notices an idle replica's dead worker: the health check's worker ping does."""
    import ray

    base, handle = tp_app
    before = _steady(handle)
    victim = next(iter(before))
    ray.kill(ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE))
    t_kill = time.monotonic()
    _wait_for(lambda: victim not in named_actors()[0], 30, "the replica with a dead worker is still up", 0.05)
    print(f"idle replica gone {time.monotonic() - t_kill:.2f}s after its worker was killed")
    assert time.monotonic() - t_kill < HEALTH_PERIOD_S + 10
    assert victim not in _steady(handle)
    assert _complete(base, 12) == tp1_text(12)


def test_killed_replica_takes_its_worker_along(tp_app):
    import ray

    base, handle = tp_app
    stats = _steady(handle)
    victim, s = next(iter(stats.items()))
    worker = ray.get_actor(worker_name(victim), namespace=TP_NAMESPACE)
    worker_pid = actor_pid(worker)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA_DEPLOYMENT}#{victim}", namespace="serve"))
    # Workers are the replica actor's children: Ray ends them with it (no orphaned rank or process group).
    _wait_for(lambda: worker_name(victim) not in named_actors()[1] and not pid_alive(worker_pid)
              and not pid_alive(s["pid"]), 30, "the dead replica's worker is still alive")
    after = _steady(handle)
    assert victim not in after


def test_deleting_the_app_stops_every_worker(tp_app):
    from ray import serve

    _, handle = tp_app
    stats = _steady(handle)
    pids = [actor_pid(__import__("ray").get_actor(worker_name(r), namespace=TP_NAMESPACE)) for r in stats]
    serve.delete(APP)
    _wait_for(lambda: not named_actors()[1] and not any(map(pid_alive, pids)), 60, "TP workers outlived the app")
