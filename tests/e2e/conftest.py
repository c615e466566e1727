"""The e2e tests' cluster: one real local Ray instance with Serve on a free loopback port for the session, and
`serve_app`, the one factory that deploys the llm-cluster app for a config and deletes it afterwards.

    @pytest.fixture(scope="module")
    def served(serve_app, tiny_model_dir):
        app = serve_app(serve_config(tiny_model_dir, {"replicas.num_replicas": 2}), name="my-test", replicas=2)
        return app.base, app.handle                 # deleted when the module's tests are done

    def test_x(serve_app, tiny_model_dir):
        with serve_app(serve_config(tiny_model_dir), name="x") as app:   # deleted at the end of the block
            ...

Apps are served at route prefix "/", so one module's app must be gone before the next deploys: the factory
is module-scoped, and a test that deploys an app of its own uses the `with` form.

`launch` runs `llm-cluster serve` as a user does, in a process of its own (it starts its own Ray, Redis and
Serve, apart from the session's): `cli = launch("--model", DIR); cli.wait_serving()`."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cluster.ports import free_port
from tests.fixtures.wait import http_ok, wait_until


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance (logical CPUs > physical so several tiny replicas fit) with Serve started."""
    import ray
    from ray import serve

    from cluster.launcher import init_ray

    # address="local": always a fresh instance of our own, never one some other process left running.
    init_ray(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="llmc-tests",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                       "OMP_NUM_THREADS": "1",
                                       "LLM_CLUSTER_FAULT_INJECTION": "1"}})  # LLMReplica._inject_fault
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class ServedApp:
    """A deployed llm-cluster app: its HTTP base URL, name, config and a handle to its LLMReplica deployment.
    As a context manager it deletes the app on exit."""
    base: str
    name: str
    cfg: Any
    handle: Any
    _apps: "AppFactory" = field(repr=False)

    def replica_stats(self) -> dict[str, dict]:
        """stats() of every replica that answers, by replica id (as dicts)."""
        from replicas.protocol import ReplicaStats

        results = self.handle.broadcast("stats").results(timeout_s=10, return_exceptions=True)
        return {s.replica_id: s.model_dump() for s in results if isinstance(s, ReplicaStats)}

    def delete(self) -> None:
        self._apps.delete(self.name)

    def __enter__(self) -> "ServedApp":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()


class AppFactory:
    """serve_app(cfg, name=..., replicas=N) -> ServedApp, once /ready answers (and, with `replicas`, once that
    many replicas answer stats()). serve_app.run(application, name, route_prefix, ready) deploys any Serve
    application with an LLMReplica deployment (a fake one) and waits for ready(). Every app it deployed and
    nobody deleted goes at close()."""

    def __init__(self, base: str):
        self.base = base
        self.names: list[str] = []

    def __call__(self, cfg, name: str = "llm-cluster", replicas: int | None = None,
                 wait_s: float = 180.0) -> ServedApp:
        from cluster.app import build_app_from_config

        app = self.run(build_app_from_config(cfg), name, ready=lambda: http_ok(self.base + "/ready"), wait_s=wait_s,
                       cfg=cfg)
        if replicas:
            wait_until(lambda: len(app.replica_stats()) >= replicas, 120, 0.5, f"{replicas} replicas of {name!r} up")
        return app

    def run(self, application, name: str, route_prefix: str = "/", *, ready, wait_s: float = 180.0,
            interval: float = 0.5, cfg=None) -> ServedApp:
        from ray import serve

        from cluster.app import REPLICA_DEPLOYMENT

        self.names.append(name)  # first: a serve.run cut short by a test timeout must still be deleted
        serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
        wait_until(ready, wait_s, interval, f"app {name!r} ready")
        return ServedApp(self.base, name, cfg, serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=name), self)

    def delete(self, name: str) -> None:
        from ray import serve

        if name in self.names:
            self.names.remove(name)
            with contextlib.suppress(Exception):  # a test may have deleted it itself
                serve.delete(name)

    def close(self) -> None:
        for name in list(reversed(self.names)):
            self.delete(name)


@pytest.fixture(scope="module")
def serve_app(ray_cluster):
    apps = AppFactory(ray_cluster)
    try:
        yield apps
    finally:
        apps.close()


@dataclass
class Launcher:
    """A running `llm-cluster serve`: its process (leader of its own session), URL and log file."""
    proc: subprocess.Popen
    base: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, timeout: float = 240.0, interval: float = 0.5, *, said: bool = True,
                     ready: bool = True) -> None:
        """Until the launcher has said it is serving (`said`) and GET /ready answers 200 (`ready`); fails at
        once if it exits."""
        def serving() -> bool:
            assert self.proc.poll() is None, "launcher exited early:\n" + self.log()[-3000:]
            return (not said or "is serving" in self.log()) and (not ready or http_ok(self.base + "/ready"))
        wait_until(serving, timeout, interval, lambda: "the launcher serving:\n" + self.log()[-3000:])


@pytest.fixture
def launch(tmp_path):
    """launch(*args) -> Launcher: `llm-cluster serve ARGS --port <free port>` in its own session (as from a
    terminal: Ctrl-C is SIGINT to its group), REDIS_URL unset (it starts its embedded Redis), its output in
    tmp_path/serve.log. Stopping it is the test's business: how it ends is often what the test checks."""
    exe = shutil.which("llm-cluster") or os.path.join(os.path.dirname(sys.executable), "llm-cluster")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)

    def start(*args: str) -> Launcher:
        port = free_port()
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([exe, "serve", *args, "--port", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return Launcher(proc, f"http://127.0.0.1:{port}", log_path)
    return start
