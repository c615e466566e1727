"""`router.http_proxy`: what answers on host:port. `haproxy` (the default) runs Ray Serve's HAProxy ingress,
each ingress replica serving HTTP itself; `serve` keeps Serve's Python proxy actor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from cluster.config import load_config
from cluster.launcher import ingress_env
from tests.fixtures.ray_cluster import free_port

START_TIMEOUT_S = 240.0


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
    assert int(a["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0


def test_unknown_http_proxy_is_refused():
    from cluster.config import ConfigError
    with pytest.raises(ConfigError, match="http_proxy"):
        load_config(overrides={"router.http_proxy": "nginx"})


def _status() -> dict:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.ray
def test_launcher_serves_through_haproxy_and_a_disconnect_frees_blocks(tiny_model_dir, tmp_path):
    exe = shutil.which("llm-cluster") or os.path.join(os.path.dirname(sys.executable), "llm-cluster")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "serve", "--model", str(tiny_model_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, "launcher exited early:\n" + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready:\n" + log_path.read_text()[-3000:]
            try:
                if "is serving" in log_path.read_text() and httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert "HAProxy started successfully" in log_path.read_text()
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
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
        # Errors keep the OpenAI shape through HAProxy.
        bad = httpx.post(base + "/v1/chat/completions", json={"model": model, "messages": []}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["type"]

        # A client leaving mid-stream: its request ends in the engine and its blocks come back.
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
            stats = [row["stats"] for row in _status()["replicas"] if row.get("stats")]
            if stats and all(s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] for s in stats):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.5)
        assert stats[0]["steps"] < 1500  # aborted, not run to its end
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
