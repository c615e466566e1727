"""Readiness probes from the first second cannot break the endpoint: `llm-cluster serve` polled the way a
Kubernetes readiness probe polls (1 s timeouts, from before anything answers) answers 200 on
/v1/models and /ready soon after its replica is up, and keeps answering 200."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

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
def test_probes_from_second_zero_get_200_once_the_replica_is_up(launch, tiny_model_dir):
    stop = threading.Event()
    results = {"/v1/models": [], "/ready": []}
    cli = launch("--model", str(tiny_model_dir))
    proc = cli.proc
    probes = [threading.Thread(target=_probe, args=(cli.base + path, stop, out), daemon=True)
              for path, out in results.items()]
    try:
        for p in probes:
            p.start()
        cli.wait_serving(START_TIMEOUT_S, 0.2, ready=False)  # the launcher says it is serving
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
