"""What a replica asks Ray for, and what it takes from its device: `replicas.num_gpus` unset means one GPU per TP
rank where the cluster has GPUs (0 means CPU, also on a GPU host), and replicas sharing a GPU size their KV
pools from their shares (CUDA queries patched: no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from cluster import app
from cluster.app import config_from_args, replica_options, resolve_gpus
from replicas.engine.config import EngineConfig
from replicas.engine.model_runner import ModelRunner, kv_budget_bytes

GiB = 2**30


def _resolved(args: dict, has_gpu: bool):
    return resolve_gpus(config_from_args(args), cluster_has_gpu=has_gpu)


def test_unset_num_gpus_follows_the_cluster():
    assert config_from_args({}).replicas.num_gpus is None
    assert config_from_args({"replicas.num_gpus": "auto"}).replicas.num_gpus is None  # as a YAML or env value
    cpu = _resolved({}, has_gpu=False)
    assert cpu.replicas.num_gpus == 0 and cpu.engine.device == "cpu" and not cpu.uses_gpu
    gpu = _resolved({"engine.tp_size": "2"}, has_gpu=True)
    assert gpu.replicas.num_gpus == 1 and gpu.engine.device == "auto" and gpu.engine.gpu_share is None
    # The engine's own device setting decides when it is not auto.
    assert _resolved({"engine.device": "cpu"}, has_gpu=True).replicas.num_gpus == 0
    assert _resolved({"engine.device": "cuda"}, has_gpu=False).replicas.num_gpus == 1


def test_explicit_zero_means_cpu_on_a_gpu_host():
    """Ray leaves a host's GPUs visible to an actor that asked for none: the engine must not pick cuda itself."""
    cfg = _resolved({"replicas.num_gpus": "0"}, has_gpu=True)
    assert cfg.replicas.num_gpus == 0 and cfg.engine.device == "cpu"
    # An operator who pins the device keeps it.
    assert _resolved({"replicas.num_gpus": "0", "engine.device": "cuda"}, has_gpu=True).engine.device == "cuda"


def test_fractional_gpus_become_the_engines_share():
    cfg = _resolved({"replicas.num_gpus": "0.25", "replicas.num_replicas": "4"}, has_gpu=True)
    assert cfg.replicas.num_gpus == 0.25 and cfg.engine.gpu_share == 0.25
    assert _resolved({"replicas.num_gpus": "1"}, has_gpu=True).engine.gpu_share is None
    assert resolve_gpus(cfg, cluster_has_gpu=False) == cfg  # idempotent, whatever the host


def test_replica_options_resolve_the_default(monkeypatch):
    monkeypatch.setattr(app, "_cluster_has_gpu", lambda: True)
    opts = replica_options(config_from_args({"engine.tp_size": "2"}))
    assert opts["placement_group_bundles"] == [{"CPU": 1, "GPU": 1.0}] * 2
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    monkeypatch.setattr(app, "_cluster_has_gpu", lambda: False)
    opts = replica_options(config_from_args({}))
    assert opts["ray_actor_options"]["num_gpus"] == 0 and "placement_group_bundles" not in opts


def test_cluster_has_gpu_asks_ray_when_ray_is_up(monkeypatch):
    import ray
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert app._cluster_has_gpu() is True  # no Ray yet: this host
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert app._cluster_has_gpu() is False  # Ray's view wins: the replicas run on its nodes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert app._cluster_has_gpu() is True


# ---------------------------------------------------------------- KV pool of a share


def test_two_halves_of_one_gpu_get_the_same_pool():
    """The second replica starts after the first took its pool: with the free-memory rule it got what was
    left (the 22,743 vs 13,611 blocks seen on an H200); from its share it gets the same as the first."""
    total, ctx, weights, act, per_block = 141 * GiB, GiB // 2, 3 * GiB, GiB // 4, 2 * 2**20
    own = weights + act
    free_a = total - ctx - weights
    blocks_a = kv_budget_bytes(free=free_a, total=total, fraction=0.85, share=0.5, own=own) // per_block
    used_a = ctx + weights + act + blocks_a * per_block + GiB  # + its CUDA graphs
    free_b = total - used_a - ctx - weights
    blocks_b = kv_budget_bytes(free=free_b, total=total, fraction=0.85, share=0.5, own=own) // per_block
    assert blocks_a == blocks_b == (int(0.5 * total * 0.85) - own) // per_block
    # The old rule: a fraction of whatever was free when each started.
    old_a, old_b = (kv_budget_bytes(free=f, total=total, fraction=0.85, share=None, own=0) // per_block
                    for f in (free_a, free_b))
    assert old_a > 1.5 * old_b


def test_share_budget_never_exceeds_free_memory():
    # Another process went past its share: a smaller pool, not an out-of-memory error.
    assert kv_budget_bytes(free=10 * GiB, total=80 * GiB, fraction=0.9, share=0.5, own=GiB) == int(9 * GiB)
    assert kv_budget_bytes(free=80 * GiB, total=80 * GiB, fraction=0.9, share=0.1, own=8 * GiB) == 0
    assert kv_budget_bytes(free=50 * GiB, total=80 * GiB, fraction=0.5, share=None, own=123) == 25 * GiB


def _runner(share, params_bytes: int, profile_bytes: int, monkeypatch, free: int, total: int) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # no model load: the sizing alone, CUDA queries patched
    runner.config = EngineConfig(gpu_share=share, kv_memory_fraction=0.8)
    runner.device = torch.device("cuda", 0)
    runner.model = torch.nn.Linear(params_bytes // 4, 1, bias=False)  # fp32: 4 bytes a weight
    monkeypatch.setattr(runner, "_profile_step_bytes", lambda args: profile_bytes)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    return runner


def test_runner_budget_from_its_share_counts_weights_and_activations(monkeypatch):
    total = 80 * GiB
    r = _runner(0.5, 4 * 2**20, 2**20, monkeypatch, free=70 * GiB, total=total)
    assert r._gpu_kv_budget(None) == int(0.5 * total * 0.8) - 4 * 2**20 - 2**20
    # Whatever the other half holds when this one starts.
    r = _runner(0.5, 4 * 2**20, 2**20, monkeypatch, free=41 * GiB, total=total)
    assert r._gpu_kv_budget(None) == int(0.5 * total * 0.8) - 5 * 2**20
    # A whole device keeps the free-memory rule (and runs no profiling step).
    r = _runner(None, 4 * 2**20, 2**20, monkeypatch, free=70 * GiB, total=total)
    r._profile_step_bytes = lambda args: pytest.fail("profiled without a share")
    assert r._gpu_kv_budget(None) == int(70 * GiB * 0.8)
