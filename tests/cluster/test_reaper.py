"""The launcher's reaper (cluster/reaper.py): on the launcher's death it ends what the launcher started."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster import reaper

HOLDER = "import sys, time; f = open(sys.argv[1], 'w'); print('ready', flush=True); time.sleep(120)"


def _holder(path, **popen) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, **popen)
    assert p.stdout.readline().strip() == "ready"
    return p


def _reap(pgid: int, lines: str) -> None:
    subprocess.run([sys.executable, "-I", reaper.__file__, str(pgid)], input=lines, text=True, timeout=30,
                   check=True)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the reaper sweeps /proc")
def test_an_owned_directory_reaps_holders_in_any_process_group(tmp_path):
    owned, watched = tmp_path / "owned", tmp_path / "watched"
    owned.mkdir(), watched.mkdir()
    # Both in sessions of their own, like HAProxy under a Ray worker: not in the launcher's process group.
    in_owned = _holder(owned / "log", start_new_session=True)
    in_watched = _holder(watched / "log", start_new_session=True)
    try:
        _reap(os.getpgrp(), f"watch {watched}\nown {owned}\n")  # EOF: the launcher is gone
        in_owned.wait(timeout=10)
        assert in_owned.returncode == -9
        time.sleep(0.5)
        # A watched (not owned) directory reaps only the launcher's process group.
        assert in_watched.poll() is None
    finally:
        for p in (in_owned, in_watched):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def test_a_clean_exit_reaps_nothing(tmp_path):
    holder = _holder(tmp_path / "log", start_new_session=True)
    try:
        _reap(os.getpgrp(), f"own {tmp_path}\ndone\n")
        time.sleep(0.5)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait(timeout=10)
