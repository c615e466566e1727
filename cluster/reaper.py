"""The launcher's reaper: ends the local Ray node's processes when the launcher dies without stopping them
(SIGKILL, the OOM killer, a closed terminal's SIGHUP).

Ray's own fate-sharing covers only part of a local node: ray.init starts its head processes (gcs_server,
raylet, dashboard, monitors) with the kernel's parent-death signal, and workers (Serve actors included) exit
within seconds of losing their raylet; but the raylet's agents (DashboardAgent, RuntimeEnvAgent) notice the
raylet's death and then spend a minute trying to report it to the dead GCS before they exit (Ray's
publish_error_to_driver has a fixed 60 s timeout, and no setting shortens it).

Finding them after the fact: they are reparented when the raylet dies (the process tree loses them), and they
rename themselves over their argv and environment (setproctitle), so neither the command line nor an
inherited environment variable identifies them. What does: they stay in the launcher's process group, and they
keep files of the node's session directory open (its logs), a directory unique to this node.

The reaper is a small separate process in its own session (a terminal's Ctrl-C does not reach it) reading a
pipe whose only write end the launcher holds. The launcher sends it the directories to watch; EOF means the
launcher is gone, however it went, and the reaper SIGKILLs every process of the launcher's process group that
holds a file under one of them. A clean exit sends "done" first and the reaper stands down: the launcher has
stopped what it started. (The embedded Redis needs none of this: it has the parent-death signal itself.)

Run as a script by reaping_on_death; it imports the standard library only.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Iterator


class Reaper:
    def __init__(self, write_fd: int):
        self._fd = write_fd

    def watch(self, directory: str) -> None:
        """On the launcher's death, kill its process group's processes that hold a file under `directory`."""
        self._send(f"watch {os.path.abspath(directory)}\n")

    def own(self, directory: str) -> None:
        """On the launcher's death, kill every process that holds a file under `directory`, a directory private
        to this launcher, whatever its process group: HAProxy (router.http_proxy) runs in a session of its own,
        and its logs are under the launcher's HAProxy directory."""
        self._send(f"own {os.path.abspath(directory)}\n")

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):  # a dead reaper: nothing left to tell
            os.write(self._fd, line.encode())


@contextlib.contextmanager
def reaping_on_death() -> Iterator[Reaper]:
    """A Reaper for the duration of the context (a no-op where there is no /proc to sweep)."""
    if not os.path.isdir("/proc"):
        yield Reaper(-1)
        return
    # os.pipe's ends are close-on-exec: no other child inherits the write end, so this process's death,
    # and nothing else, closes it.
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpgrp())],
                                stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
    reaper = Reaper(write_end)
    try:
        yield reaper
    finally:
        reaper._send("done\n")
        os.close(write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _holders(pgid: int, dirs: list[str], me: int, owned: list[str] = ()) -> list[int]:
    """Processes of process group `pgid` holding a file under one of `dirs`, and any process holding one under
    one of `owned`."""
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs)
    owned_prefixes = tuple(d.rstrip("/") + "/" for d in owned)
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            wanted = prefixes if os.getpgid(pid) == pgid else ()
            wanted += owned_prefixes
            if not wanted:
                continue
            fd_dir = f"/proc/{pid}/fd"
            if any(os.readlink(f"{fd_dir}/{fd}").startswith(wanted) for fd in os.listdir(fd_dir)):
                pids.append(pid)
        except OSError:  # gone meanwhile, or not ours to read (and so not ours to kill)
            continue
    return pids


def reap(pgid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    dirs: list[str] = []
    owned: list[str] = []
    for line in sys.stdin:
        command, _, arg = line.rstrip("\n").partition(" ")
        if command == "done":
            return 0
        if command in ("watch", "own") and arg:
            (dirs if command == "watch" else owned).append(arg)
    if not dirs and not owned:
        return 0
    # Several sweeps: a process may fork between our reading /proc and its death.
    for _ in range(20):
        pids = _holders(pgid, dirs, os.getpid(), owned)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(reap(int(sys.argv[1])))
