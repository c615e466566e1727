"""Replicas spread over Ray nodes, and losing a node under load.

The scenario needs a Ray cluster of its own (several raylets), which cannot share a process with the
session `ray_cluster` fixture: it runs in a subprocess (tests/e2e/multinode_scenario.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.app import replica_options
from cluster.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_max_replicas_per_node_is_passed_to_serve_and_needs_tp1():
    cfg = load_config(overrides=["replicas.max_replicas_per_node=1"])
    assert replica_options(cfg)["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in replica_options(load_config())  # default: Serve's soft SPREAD
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        load_config(overrides=["replicas.max_replicas_per_node=1", "engine.tp_size=2"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(200)
def test_node_removed_under_load_no_failed_requests_and_capacity_restored(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}  # never join another Ray cluster
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.multinode_scenario", str(tiny_model_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=190)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    before = out["placement_before"]
    assert len(before) == 2 and len(set(before.values())) == 2  # one replica per node
    assert out["failed"] == 0, out["errors"]
    assert out["ok"] > 0
    assert out["restored_s"] < 120
