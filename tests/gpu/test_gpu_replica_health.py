"""LLMReplica's device check on a real GPU: a healthy device passes, a broken one is flagged (the CPU-side
health tests: tests/serving/test_replica_health.py)."""
from __future__ import annotations

import pytest

_BAD_DEVICE = """
import asyncio, torch
from cluster.config import load_config
from replicas.deployment import LLMReplica
r = LLMReplica.__new__(LLMReplica)  # the probe needs only the device and the config
r.config, r._device = load_config(), torch.device("cuda", 0)
assert asyncio.run(r._device_problem()) is None, "healthy device flagged"
x = torch.zeros(4, device="cuda")
x[torch.tensor([1 << 20], device="cuda")] += 1  # out of bounds: a device-side assert, sticky for the process
print("PROBLEM:", asyncio.run(r._device_problem()))
"""


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
def test_cuda_probe_passes_a_healthy_device_and_flags_a_broken_one():
    import subprocess
    import sys
    # In a subprocess: the injected CUDA error poisons the whole process's context.
    out = subprocess.run([sys.executable, "-c", _BAD_DEVICE], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBLEM:")), "")
    assert "device cuda:0 check failed" in line, (out.stdout[-2000:], out.stderr[-2000:])
