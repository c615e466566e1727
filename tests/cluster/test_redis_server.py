"""cluster.redis_server: an embedded real Redis that starts, restarts on its port, and stops by pid."""
from __future__ import annotations

import os
from pathlib import Path

import redis

from cluster.redis_server import EmbeddedRedis, _ping


def test_lifecycle_restart_keeps_port_and_comes_back_empty():
    with EmbeddedRedis() as server:
        assert server.url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        client.set("k", "v")
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        pid, port, data_dir = server.pid, server.port, Path(server._dir)
        server.restart(graceful=False)
        assert server.port == port and server.pid != pid
        assert client.get("k") is None  # no persistence; the client reconnected by itself
        client.close()

        server.pause()
        assert not _ping(port, 0.2)  # hung: connects, never answers
        server.resume()
        assert server.running()
        pid = server.pid
    assert not server.running()
    assert not _pid_alive(pid)
    assert not data_dir.exists()


def test_stop_kills_a_paused_server():
    server = EmbeddedRedis().start()
    pid = server.pid
    server.pause()
    server.close()
    assert not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
