"""The Serve application: the one place where config becomes Serve options.

Used by the CLI launcher, by `serve run cluster.app:build_app [key=value ...]`, and by KubeRay's
serveConfigV2 (`import_path: cluster.app:build_app`, `args:` the config as a mapping).
"""
from __future__ import annotations

from typing import Any, Mapping

from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig, load_config

REPLICA_DEPLOYMENT = "LLMReplica"
INGRESS_DEPLOYMENT = "OpenAIIngress"


def config_from_args(args: Mapping[str, Any] | None) -> ClusterConfig:
    """Serve args -> ClusterConfig. Accepts `config: path.yaml`, nested sections (KubeRay YAML), and
    dotted keys (`engine.block_size: 32`, as `serve run ... engine.block_size=32` passes them)."""
    args = dict(args or {})
    path = args.pop("config", None)
    nested = {k: v for k, v in args.items() if "." not in k}
    dotted = {k: v for k, v in args.items() if "." in k}
    return load_config(path, overrides=dotted, data=nested)


def replica_options(cfg: ClusterConfig) -> dict[str, Any]:
    tp = cfg.engine.tp_size
    bundle = {"CPU": cfg.replicas.num_cpus}
    if cfg.uses_gpu:
        bundle["GPU"] = cfg.replicas.num_gpus
    opts: dict[str, Any] = dict(
        name=REPLICA_DEPLOYMENT,
        max_ongoing_requests=cfg.replicas.max_ongoing_requests,
        health_check_period_s=cfg.replicas.health_check_period_s,
        health_check_timeout_s=cfg.replicas.health_check_timeout_s,
        graceful_shutdown_timeout_s=cfg.replicas.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
    )
    if tp > 1:
        # Rank 0 is the replica actor in bundle 0; workers take the other bundles, packed on one node.
        opts["placement_group_bundles"] = [dict(bundle) for _ in range(tp)]
        opts["placement_group_strategy"] = "STRICT_PACK"
    opts["ray_actor_options"] = {"num_cpus": cfg.replicas.num_cpus, "num_gpus": cfg.replicas.num_gpus}
    if cfg.replicas.max_replicas_per_node is not None:
        # Serve already SPREADs replicas over nodes (best effort); this makes it a hard cap.
        opts["max_replicas_per_node"] = cfg.replicas.max_replicas_per_node
    if cfg.autoscaling.enabled:
        opts["autoscaling_config"] = autoscaling_config(cfg)
    else:
        opts["num_replicas"] = cfg.replicas.num_replicas
    router_cfg = request_router_config(cfg)
    if router_cfg is not None:
        opts["request_router_config"] = router_cfg
    return opts


def autoscaling_config(cfg: ClusterConfig) -> dict[str, Any]:
    a = cfg.autoscaling
    out: dict[str, Any] = dict(
        min_replicas=a.min_replicas, max_replicas=a.max_replicas,
        initial_replicas=a.initial_replicas, upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s, metrics_interval_s=a.metrics_interval_s,
        look_back_period_s=a.look_back_period_s,
    )
    try:
        from cluster.autoscaling import policy_config
    except ImportError:  # policy module not present: Serve's default (ongoing requests)
        return out
    out["policy"] = policy_config(cfg)
    # The policy applies the configured delays itself (so it logs each decision when it makes it);
    # Serve's delay logic would hold that decision back a second time.
    out.update(upscale_delay_s=0.0, downscale_delay_s=0.0)
    return out


def request_router_config(cfg: ClusterConfig):
    try:
        from router.routing import router_config
    except ImportError:  # no custom router yet: Serve's default pow-2
        return None
    return router_config(cfg)


def ingress_options(cfg: ClusterConfig) -> dict[str, Any]:
    return dict(name=INGRESS_DEPLOYMENT, num_replicas=cfg.router.num_router_replicas,
                ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)


def build_app_from_config(cfg: ClusterConfig) -> Application:
    from replicas.deployment import LLMReplica
    from router.api import OpenAIIngress

    replica = serve.deployment(LLMReplica).options(**replica_options(cfg)).bind(cfg)
    return serve.deployment(OpenAIIngress).options(**ingress_options(cfg)).bind(cfg, replica)


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """Serve's app builder entry point."""
    return build_app_from_config(config_from_args(args))
