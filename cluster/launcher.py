"""The local launcher: one command brings up Ray, an embedded Redis (unless REDIS_URL is set) and the
Serve app on host:port, and Ctrl-C (or SIGTERM) takes all of it down again."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Iterator, Mapping

from cluster.config import ClusterConfig
from cluster.ports import free_port

log = logging.getLogger("llm_cluster")


def init_ray(*, attempts: int = 2, **kwargs):
    """ray.init, tried again when a local node misses Ray's fixed 30 s start-up deadline (a saturated box:
    the raylet registers late). Any other failure is raised at once."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()  # the half-started node's processes
            if attempt == attempts or "timed out during startup" not in str(e):
                raise
            log.warning("Ray's local node did not start in time (%s); starting it again", e)


@contextlib.contextmanager
def running_cluster(cfg: ClusterConfig, *, num_cpus: int | None = None, ray_address: str | None = None,
                    dashboard: bool = True, log_to_driver: bool = True) -> Iterator[ClusterConfig]:
    """Start everything for `cfg`, yield the effective config (with redis_url filled in), stop on exit."""
    import ray
    from ray import serve

    from cluster.app import build_app_from_config
    from replicas.engine.model_prep import resolve_engine_config

    with contextlib.ExitStack() as stack:
        # Prepare the model here, with a progress bar the user sees, not silently inside a replica.
        cfg = cfg.model_copy(update={"engine": resolve_engine_config(cfg.engine)})
        # First in, last out: should this process die without running the exits below (SIGKILL, OOM), the
        # reaper ends the local Ray node; Ray's own fate-sharing leaves the raylet's agents running a minute.
        from cluster.reaper import reaping_on_death
        reaper = stack.enter_context(reaping_on_death())
        if not cfg.redis_url:
            from cluster.redis_server import EmbeddedRedis
            redis = stack.enter_context(EmbeddedRedis())
            cfg = cfg.model_copy(update={"redis_url": redis.url})
            log.info("embedded Redis on %s", redis.url)
        started_ray = not ray.is_initialized()
        if started_ray and not ray_address:
            # Ray's processes read these at import: they must be in the environment the local node inherits.
            state_dir = tempfile.mkdtemp(prefix="llmc-ingress-")
            stack.callback(shutil.rmtree, state_dir, True)
            reaper.own(state_dir)  # HAProxy's logs are there; it runs outside the launcher's process group
            stack.enter_context(_environ(ingress_env(cfg, state_dir)))
        if started_ray:
            ctx = init_ray(
                address=ray_address or "local", num_cpus=None if ray_address else (num_cpus or _logical_cpus(cfg)),
                include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
            stack.callback(ray.shutdown)
            session_dir = getattr(ctx, "address_info", {}).get("session_dir")
            if session_dir and not ray_address:  # a node of our own, not a cluster we joined
                reaper.watch(session_dir)
        serve.start(http_options={"host": cfg.router.host, "port": cfg.router.port})
        stack.callback(serve.shutdown)
        serve.run(build_app_from_config(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        yield cfg


def ingress_env(cfg: ClusterConfig, state_dir: str) -> dict[str, str]:
    """The Ray Serve environment that puts `router.http_proxy` in front of the ingress replicas."""
    if cfg.router.http_proxy != "haproxy":
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # Per node of ours, so two clusters on one host do not share HAProxy's files or its metrics port.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state_dir, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state_dir, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state_dir, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(cfg.router.host)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(cfg.router.host)),
        # A stopping ingress replica keeps serving this long so HAProxy takes it out first; Serve's 30 s
        # default waits for external load balancers, and HAProxy here reloads within a second.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _logical_cpus(cfg: ClusterConfig) -> int:
    # Replicas reserve CPUs logically; on a small box let several replicas share the cores.
    want = cfg.replicas.num_cpus * cfg.engine.tp_size * max(cfg.replicas.num_replicas, cfg.autoscaling.max_replicas)
    return max(os.cpu_count() or 1, int(want) + 2)


def serve_forever(cfg: ClusterConfig) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with running_cluster(cfg) as live:
        base = f"http://{live.router.host}:{live.router.port}"
        auth = ' -H "Authorization: Bearer $LLM_CLUSTER_API_KEY"' if live.router.api_keys else ""
        print(f"\nllm-cluster is serving {live.engine.served_model_id} on {base}  (Ctrl-C stops everything)\n"
              f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
              f"    -d '{{\"model\": \"{live.engine.served_model_id}\", \"messages\": "
              f"[{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'\n", flush=True)
        stop.wait()
        print("shutting down ...", flush=True)
