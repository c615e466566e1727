"""README command 1 as a user runs it: `llm-cluster serve` on the embedded default answers the France
question over HTTP, and Ctrl-C takes Serve, Ray and the embedded Redis down cleanly."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from tests.fixtures.wait import wait_until


@pytest.mark.slow
def test_serve_answers_france_and_ctrl_c_stops_everything(launch, smollm2_dir):
    # Its own process group, like a terminal job: Ctrl-C is SIGINT to the whole group.
    cli = launch()
    proc, base = cli.proc, cli.base
    try:
        cli.wait_serving(240, 1, said=False)
        r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        out = cli.log()
        assert f"curl {base}/v1/chat/completions" in out  # the launcher prints a working example
        redis_port = int(re.search(r"embedded Redis on redis://127\.0\.0\.1:(\d+)", out).group(1))
        check_ingress(base, proc.pid)
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


def check_ingress(base: str, launcher_pid: int) -> None:
    """On a cluster `llm-cluster serve` started, whichever proxy answers: streams carry the same text as whole
    responses, errors keep the OpenAI shape, a client leaving mid-stream frees its blocks, and
    `llm-cluster status` attaches to the launcher's node to show it."""
    model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
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
    stats = wait_until(lambda: [row["stats"] for row in _status(address)["replicas"] if row.get("stats")], 20, 0.5,
                       "every replica idle with its KV blocks free", until=lambda stats: stats and all(
                           s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] for s in stats))
    assert stats[0]["steps"] - before[0]["steps"] < 1500  # aborted, not run to its end
