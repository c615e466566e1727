"""free_port: a loopback port nothing listens on, for the local processes the launcher, benchmarks and tests
start (Redis, Serve's proxy, Ray's head ports)."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
