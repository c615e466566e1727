"""The soak step (load_tests/soak.py) run as the command line runs it: a one-minute soak on a real local cluster
of two tiny-model replicas with one replica SIGKILLed at 15 s and Redis SIGKILLed at 30 s (restarted at 42 s),
in its own process so that it owns its Ray instance. Its pieces without a cluster:
tests/load_tests/test_load_soak.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from load_tests.soak import REQUIRED_ROLES

ROOT = Path(__file__).resolve().parents[2]


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
