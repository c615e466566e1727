"""free_port: a port nothing listens on (loopback unless a host is given), for the local processes the launcher,
benchmarks and tests start (Redis, HAProxy's metrics and stats, Serve's proxy, Ray's head ports)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
