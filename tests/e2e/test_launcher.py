"""README command 1 as a user runs it: `llm-cluster serve` on the embedded default answers the France
question over HTTP, and Ctrl-C takes Serve, Ray and the embedded Redis down cleanly."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from cluster.ports import free_port
from tests.fixtures.wait import http_ok, wait_until
from tests.test_http_proxy import check_haproxy_ingress


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    def ready() -> bool:
        assert proc.poll() is None, "launcher exited early"
        return http_ok(base + "/ready")
    wait_until(ready, timeout, 1, "the cluster ready")


@pytest.mark.slow
def test_serve_answers_france_and_ctrl_c_stops_everything(smollm2_dir, tmp_path):
    exe = shutil.which("llm-cluster") or os.path.join(os.path.dirname(sys.executable), "llm-cluster")
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)
    # Its own process group, like a terminal job: Ctrl-C is SIGINT to the whole group.
    proc = subprocess.Popen([exe, "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, timeout=240)
        r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        log.seek(0)
        out = log.read()
        assert f"curl {base}/v1/chat/completions" in out  # the launcher prints a working example
        redis_port = int(re.search(r"embedded Redis on redis://127\.0\.0\.1:(\d+)", out).group(1))
        check_haproxy_ingress(base, out, "SmolLM2-135M-Instruct", proc.pid)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.info if hasattr(p, 'info') else p.pid for p in alive]}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/health", timeout=2)
        assert not any(c.laddr.port == redis_port for c in psutil.net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
