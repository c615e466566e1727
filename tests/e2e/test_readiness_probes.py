"""Readiness probes from the first second cannot break the endpoint: `llm-cluster serve` polled the way a
Kubernetes readiness probe polls (1 s timeouts, from before anything answers) answers 200 on
/v1/models and /ready soon after its replica is up, and keeps answering 200."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cluster.ports import free_port
from tests.fixtures.wait import wait_until

UP_WITHIN_S = 30.0  # after the launcher says it is serving (its replica is up)
KEEP_S = 10.0  # every probe after that answers 200
START_TIMEOUT_S = 240.0


def _probe(url: str, stop: threading.Event, out: list) -> None:
    with httpx.Client(timeout=1.0) as client:
        while not stop.is_set():
            t = time.monotonic()
            try:
                status = client.get(url).status_code
            except httpx.HTTPError:
                status = None  # timed out or refused: what a probe counts as a failure
            out.append((t, status))
            stop.wait(0.2)


@pytest.mark.slow
@pytest.mark.ray
def test_probes_from_second_zero_get_200_once_the_replica_is_up(tiny_model_dir, tmp_path):
    exe = shutil.which("llm-cluster") or os.path.join(os.path.dirname(sys.executable), "llm-cluster")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)
    stop = threading.Event()
    results = {"/v1/models": [], "/ready": []}
    probes = [threading.Thread(target=_probe, args=(base + path, stop, out), daemon=True)
              for path, out in results.items()]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "serve", "--model", str(tiny_model_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        for p in probes:
            p.start()
        def serving() -> bool:
            assert proc.poll() is None, "launcher exited early:\n" + log_path.read_text()[-3000:]
            return "is serving" in log_path.read_text()
        wait_until(serving, START_TIMEOUT_S, 0.2, "the launcher to say it is serving")
        up = time.monotonic()

        def first_ok(out: list) -> float | None:
            return next((t for t, s in list(out) if s == 200 and t >= up - 60), None)

        wait_until(lambda: all(first_ok(o) for o in results.values()), UP_WITHIN_S, 0.2, check=False)  # asserted below
        firsts = {path: first_ok(out) for path, out in results.items()}
        assert all(firsts.values()), f"no 200 within {UP_WITHIN_S} s of the replica being up: " + str(
            {path: out[-5:] for path, out in results.items()})
        time.sleep(KEEP_S)
        stop.set()
        for p in probes:
            p.join(5)
        for path, out in results.items():
            after = [s for t, s in out if t >= firsts[path]]
            assert len(after) >= KEEP_S, (path, after)  # probes kept coming
            assert all(s == 200 for s in after), (path, [s for s in after if s != 200][:10])
        # The early probes really did give up while nothing answered: a probe abandoned mid-load must not
        # break the load for the probes after it.
        assert any(s != 200 for t, s in results["/v1/models"] if t < up)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
