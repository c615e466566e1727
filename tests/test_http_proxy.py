"""`router.http_proxy`: what answers on host:port. `haproxy` (the default) runs Ray Serve's HAProxy ingress,
each ingress replica serving HTTP itself; `serve` keeps Serve's Python proxy actor."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from cluster.config import load_config
from cluster.launcher import ingress_env


def test_serve_proxy_needs_no_environment(tmp_path):
    assert ingress_env(load_config(overrides={"router.http_proxy": "serve"}), str(tmp_path)) == {}


def test_haproxy_environment_is_private_to_one_cluster(tmp_path):
    cfg = load_config()
    assert cfg.router.http_proxy == "haproxy"
    a, b = ingress_env(cfg, str(tmp_path / "a")), ingress_env(cfg, str(tmp_path / "b"))
    assert a["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == a["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # Two clusters on one host must not share HAProxy's config, admin socket or state files.
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert a[key].startswith(str(tmp_path / "a")) and b[key].startswith(str(tmp_path / "b"))
    # Nor HAProxy's fixed default ports (8404 stats, 9101 metrics): a second cluster's HAProxy would not start.
    ports = {int(a["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(a["RAY_SERVE_HAPROXY_STATS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}


def test_unknown_http_proxy_is_refused():
    from cluster.config import ConfigError
    with pytest.raises(ConfigError, match="http_proxy"):
        load_config(overrides={"router.http_proxy": "nginx"})


def _gcs_address(launcher_pid: int) -> str:
    """The Ray address of the node a launcher started (other Ray nodes may run on this host)."""
    for p in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            m = re.search(r"--gcs-address=([\w.\-]+:\d+)", " ".join(p.cmdline()))
            if m:
                return m.group(1)
    raise AssertionError("no Ray process under the launcher names its GCS address")


def _status(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json", "--address", address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def check_haproxy_ingress(base: str, log: str, model: str, launcher_pid: int) -> None:
    """On a cluster `llm-cluster serve` started with the default proxy: HAProxy answers, streams carry the same
    text as whole responses, errors keep the OpenAI shape, and a client leaving mid-stream frees its blocks."""
    assert "HAProxy started successfully" in log
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 12,
            "temperature": 0}
    whole = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert whole.status_code == 200 and whole.headers.get("x-replica-id")
    text = ""
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert text == whole.json()["choices"][0]["message"]["content"]
    bad = httpx.post(base + "/v1/chat/completions", json={"model": model, "messages": []}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"]

    address = _gcs_address(launcher_pid)
    before = [row["stats"] for row in _status(address)["replicas"] if row.get("stats")]
    long = {"model": model, "prompt": "The quick brown fox " * 8, "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=long, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 3:
                break
    deadline = time.monotonic() + 20
    while True:
        stats = [row["stats"] for row in _status(address)["replicas"] if row.get("stats")]
        if stats and all(s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
    assert stats[0]["steps"] - before[0]["steps"] < 1500  # aborted, not run to its end
