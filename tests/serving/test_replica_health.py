"""LLMReplica health and queue stats outside Serve: stall / dead-loop detection, fault injection gate,
the TP-worker hook, and the waiting figure reported to the autoscaler."""
from __future__ import annotations

import asyncio
import time

import pytest

from cluster.config import load_config
from replicas import deployment
from replicas.deployment import LLMReplica, ReplicaUnhealthy
from replicas.engine.protocol import GenerationRequest, SamplingParams
from tests.fixtures.configs import cluster_config
from tests.fixtures.wait import wait_until_async


@pytest.fixture
def replica(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(deployment.FAULT_INJECTION_ENV, "1")
    exits: list[int] = []
    monkeypatch.setattr(deployment, "_exit_process", lambda: exits.append(1))
    cfg = cluster_config(tiny_model_dir, {"engine.num_kv_blocks": 64, "engine.block_size": 4,
                                          "replicas.stall_timeout_s": 0.3})
    r = LLMReplica(cfg.replica_config())
    r.exits = exits
    yield r
    r.engine.shutdown(timeout=0.5)


def req(rid: str, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=[1, 2, 3, 4, 5],
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def drain(replica, rid, max_tokens=4):
    return [c async for c in replica.generate(req(rid, max_tokens))]


async def test_healthy_replica_passes_while_serving(replica):
    task = asyncio.create_task(drain(replica, "a", 32))
    for _ in range(5):
        await replica.check_health()
        await asyncio.sleep(0.1)
    chunks = await asyncio.wait_for(task, 30)
    assert chunks[-1].usage.completion_tokens == 32
    await asyncio.sleep(0.5)  # idle longer than stall_timeout_s: idle is not a stall
    await replica.check_health()
    assert replica.exits == []


async def test_stalled_loop_with_work_exits(replica):
    await drain(replica, "warm")
    assert replica._inject_fault("stall") == replica.replica_id
    task = asyncio.create_task(drain(replica, "stuck"))
    await asyncio.sleep(0.1)
    await replica.check_health()                    # stalled, but not for stall_timeout_s yet
    assert replica.exits == []
    await asyncio.sleep(0.4)
    with pytest.raises(ReplicaUnhealthy, match="not ticked"):
        await replica.check_health()
    assert replica.exits == [1]
    assert not task.done()                          # the stream would hang: hence exiting the process
    task.cancel()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
async def test_dead_loop_thread_exits(replica):
    replica._inject_fault("crash")
    task = asyncio.create_task(drain(replica, "x"))
    await wait_until_async(lambda: not replica.engine.is_alive(), 5, 0.05, check=False)  # check_health judges
    with pytest.raises(ReplicaUnhealthy, match="thread is dead"):
        await replica.check_health()
    assert replica.exits == [1]
    task.cancel()


async def test_tp_worker_hook_failure_exits(replica):
    calls = []

    def check_workers(timeout_s):
        calls.append(timeout_s)
        raise RuntimeError("worker rank 1 died")
    replica.engine.check_workers = check_workers
    with pytest.raises(ReplicaUnhealthy, match="worker rank 1 died"):
        await replica.check_health()
    assert calls and calls[0] > 0 and replica.exits == [1]


async def test_slow_fault_stretches_steps_without_breaking_health(replica):
    replica._inject_fault("slow")
    replica._inject_fault("slow")                   # idempotent: wraps the real step, not the last fault
    t0 = time.monotonic()
    chunks = await drain(replica, "s", 6)
    elapsed = time.monotonic() - t0
    assert chunks[-1].usage.completion_tokens == 6
    assert 6 * 0.05 <= elapsed < 6 * 0.1 + 1.0
    await replica.check_health()
    assert replica.exits == []


def test_fault_injection_needs_the_env_gate(replica, monkeypatch):
    monkeypatch.delenv(deployment.FAULT_INJECTION_ENV)
    with pytest.raises(PermissionError):
        replica._inject_fault("stall")
    monkeypatch.setenv(deployment.FAULT_INJECTION_ENV, "1")
    with pytest.raises(ValueError):
        replica._inject_fault("melt")


async def test_streams_not_yet_in_the_scheduler_count_as_waiting(replica):
    replica._inject_fault("stall")
    tasks = [asyncio.create_task(drain(replica, f"r{i}")) for i in range(3)]
    await asyncio.sleep(0.2)
    stats = replica.record_autoscaling_stats()
    assert set(stats) == {"waiting", "running", "pending_prefill_tokens"}
    assert all(isinstance(v, float) for v in stats.values())
    # However the stuck loop took them in, all three are queued work for the autoscaler.
    assert stats["waiting"] + stats["running"] == 3
    routing = replica.record_routing_stats()  # and for the request router, by the same definition
    assert routing["waiting"] + routing["running"] == 3
    for t in tasks:
        t.cancel()


@pytest.mark.parametrize("overrides, env, cores, want", [
    ({}, {}, 2, 2),                                               # the embedded default uses the box's cores
    ({"autoscaling.enabled": True, "autoscaling.max_replicas": 4}, {}, 2, 1),   # shared among replicas
    ({"replicas.num_replicas": 2}, {}, 8, 4),
    ({"engine.tp_size": 2}, {}, 8, 4),
    ({"replicas.num_cpus": 3, "replicas.num_replicas": 4}, {}, 8, 3),  # never below the reservation
    ({}, {"OMP_NUM_THREADS": "1"}, 2, None),                     # the operator's runtime env wins
    ({"replicas.torch_threads": 5}, {"OMP_NUM_THREADS": "1"}, 2, 5),  # the explicit setting wins over both
])
def test_cpu_threads(overrides, env, cores, want):
    assert deployment.cpu_threads(load_config(overrides=overrides).replica_config(), env_vars=env, cores=cores) == want


def test_replica_applies_its_torch_threads(tiny_model_dir, monkeypatch):
    import torch
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = cluster_config(tiny_model_dir, {"engine.num_kv_blocks": 16, "engine.block_size": 4,
                                          "replicas.torch_threads": 1})
    r = LLMReplica(cfg.replica_config())
    try:
        assert torch.get_num_threads() == 1 and asyncio.run(r.stats()).torch_threads == 1
    finally:
        r.engine.shutdown(timeout=0.5)
        torch.set_num_threads(before)
