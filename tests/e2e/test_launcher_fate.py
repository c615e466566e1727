"""Nothing outlives the launcher: when `llm-cluster serve` is SIGKILLed (or OOM-killed), every process it
started ends within 15 s: the embedded redis-server (detached in its own session), Ray's head processes, the
raylet's agents, the workers and the Serve actors, and the launcher's own reaper."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.e2e.test_launcher import check_ingress
from tests.fixtures.wait import wait_until

START_TIMEOUT_S = 240.0
GONE_WITHIN_S = 15.0


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:  # is_running compares start times, so a reused pid does not count; a zombie is dead
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_sigkilled_launcher_leaves_no_process_behind(launch, tiny_model_dir):
    # Its own session, as from a terminal; its children are found by walking its process tree.
    # With HAProxy in front (router.http_proxy), so its process is among those that must end too.
    cli = launch("--model", str(tiny_model_dir), "--set", "router.http_proxy=haproxy")
    proc = cli.proc
    started: list[psutil.Process] = []
    try:
        cli.wait_serving(START_TIMEOUT_S)  # serving, and its replica up: every kind of process it starts is running
        started = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in started}
        redis_port = int(re.search(r"embedded Redis on redis://127\.0\.0\.1:(\d+)", cli.log()).group(1))
        # The detached redis-server is still the launcher's child; the replica runs as a Ray worker.
        assert "redis-server" in names, names
        assert "raylet" in names and "gcs_server" in names, names
        assert any("LLMReplica" in n or "ServeReplica" in n for n in names), names
        assert "haproxy" in names, names
        assert "HAProxy started successfully" in cli.log()
        check_ingress(cli.base, proc.pid)  # what HAProxy in front of the ingress must keep

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        alive = wait_until(lambda: _alive(started), GONE_WITHIN_S, 0.25, until=lambda alive: not alive, check=False)
        assert not alive, f"alive {GONE_WITHIN_S:.0f} s after the launcher was SIGKILLed: {_describe(alive)}"
        assert not any(c.laddr.port == redis_port for c in psutil.net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for p in _alive(started):  # by pid, only what this launcher started
            try:
                p.kill()
            except psutil.Error:
                pass


_REDIS_PARENT = """
import sys, threading, time
from cluster.redis_server import EmbeddedRedis
servers = [EmbeddedRedis().start()]
# Started from a thread that then ends: the parent-death signal follows the forking thread, so the server
# must be forked elsewhere to survive this.
t = threading.Thread(target=lambda: servers.append(EmbeddedRedis().start()))
t.start(); t.join()
print(" ".join(str(s.pid) for s in servers), flush=True)
time.sleep(600)
"""


def test_embedded_redis_dies_with_its_parent_however_it_dies():
    proc = subprocess.Popen([sys.executable, "-c", _REDIS_PARENT], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    servers: list[psutil.Process] = []
    try:
        servers = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert len(servers) == 2
        time.sleep(1)
        assert len(_alive(servers)) == 2, "a server ended with the thread that started it"
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: _alive(servers), 5, 0.1, until=lambda alive: not alive, check=False)
        assert not _alive(servers), _describe(_alive(servers))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for p in _alive(servers):
            p.kill()
