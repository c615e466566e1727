"""cluster.launcher.init_ray: a local node that misses Ray's start-up deadline is started once more;
every other failure surfaces at once."""
from __future__ import annotations

import sys
import types

import pytest

from cluster.launcher import init_ray


def fake_ray(monkeypatch, failures: list[Exception]):
    calls: list[str] = []

    def init(**kwargs):
        calls.append("init")
        if failures:
            raise failures.pop(0)
        return kwargs

    mod = types.SimpleNamespace(init=init, shutdown=lambda: calls.append("shutdown"))
    monkeypatch.setitem(sys.modules, "ray", mod)
    return calls


STARTUP = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


def test_startup_timeout_is_retried_after_cleaning_up(monkeypatch):
    calls = fake_ray(monkeypatch, [STARTUP])
    assert init_ray(address="local", num_cpus=2) == {"address": "local", "num_cpus": 2}
    assert calls == ["init", "shutdown", "init"]


def test_gives_up_after_the_attempts(monkeypatch):
    calls = fake_ray(monkeypatch, [STARTUP, STARTUP])
    with pytest.raises(Exception, match="timed out during startup"):
        init_ray(address="local")
    assert calls == ["init", "shutdown", "init", "shutdown"]


def test_other_failures_are_not_retried(monkeypatch):
    calls = fake_ray(monkeypatch, [ValueError("bad runtime_env")])
    with pytest.raises(ValueError, match="bad runtime_env"):
        init_ray(address="local")
    assert calls == ["init", "shutdown"]
