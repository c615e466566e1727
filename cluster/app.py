"""The Serve application: the one place where config becomes Serve options.

Used by the CLI launcher, by `serve run cluster.app:build_app [key=value ...]`, and by KubeRay's
serveConfigV2 (`import_path: cluster.app:build_app`, `args:` the config as a mapping).
"""
from __future__ import annotations

from typing import Any, Mapping

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig, load_config
from replicas.deployment import LLMReplica
from router.api import OpenAIIngress
from router.autoscaling import POLICY_PATH
from router.config import RoutingKnobs
from router.replica_choice import STATS_PERIOD_S, RoutingParams
from router.routing import KVAwareRouter

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


def resolve_gpus(cfg: ClusterConfig, cluster_has_gpu: bool | None = None) -> ClusterConfig:
    """The config with `replicas.num_gpus` concrete, and the engine told what that means.

    Unset: one GPU per TP rank when the cluster has a GPU (engine.device "cpu" opts out), else 0. A replica
    that asks Ray for no GPU gets device "cpu" when its device is "auto": Ray leaves a host's GPUs visible to
    such an actor, and the engine would otherwise take cuda:0 outside Ray's accounting. A fraction below 1
    becomes engine.gpu_share, so replicas sharing a device size their KV pools from their shares instead of
    from whatever the others left free. Idempotent."""
    n = cfg.replicas.num_gpus
    if n is None:
        if cfg.engine.device == "cpu":
            n = 0.0
        elif cfg.engine.device == "cuda":
            n = 1.0
        else:
            n = 1.0 if (_cluster_has_gpu() if cluster_has_gpu is None else cluster_has_gpu) else 0.0
    engine = {}
    if n == 0 and cfg.engine.device == "auto":
        engine["device"] = "cpu"
    if 0 < n < 1 and cfg.engine.gpu_share is None:
        engine["gpu_share"] = n
    return cfg.model_copy(update={"replicas": cfg.replicas.model_copy(update={"num_gpus": n}),
                                  "engine": cfg.engine.model_copy(update=engine)})


def _cluster_has_gpu() -> bool:
    """Ray's view when Ray is up (the app is built where replicas will not run: a head node, a laptop driving a
    remote cluster), else this host's."""
    import ray
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch
    return torch.cuda.is_available()


def replica_options(cfg: ClusterConfig) -> dict[str, Any]:
    cfg = resolve_gpus(cfg)
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
    opts["request_router_config"] = request_router_config(cfg)
    return opts


def autoscaling_config(cfg: ClusterConfig) -> dict[str, Any]:
    a = cfg.autoscaling
    out: dict[str, Any] = dict(
        min_replicas=a.min_replicas, max_replicas=a.max_replicas,
        initial_replicas=a.initial_replicas, upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s, metrics_interval_s=a.metrics_interval_s,
        look_back_period_s=a.look_back_period_s,
    )
    out["policy"] = policy_config(cfg)
    # The policy applies the configured delays itself (so it logs each decision when it makes it);
    # Serve's delay logic would hold that decision back a second time.
    out.update(upscale_delay_s=0.0, downscale_delay_s=0.0)
    return out


def policy_config(cfg: ClusterConfig) -> dict[str, Any]:
    """The `policy` entry of the LLMReplica deployment's autoscaling_config (dict form: also valid in a
    KubeRay serveConfigV2). Serve's own up/downscale delays must be 0 alongside it (autoscaling_config)."""
    a = cfg.autoscaling
    return {"policy_function": POLICY_PATH, "policy_kwargs": dict(
        max_num_seqs=cfg.engine.max_num_seqs,
        target_waiting_per_replica=a.target_waiting_per_replica,
        target_prefill_tokens_per_replica=a.target_prefill_tokens_per_replica,
        target_running_fraction=a.target_running_fraction,
        upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s)}


def request_router_config(cfg: ClusterConfig) -> RequestRouterConfig:
    """The LLMReplica deployment's RequestRouterConfig: the operator's routing knobs plus what the deployment
    fills in, shipped to every handle's router as `request_router_kwargs` (JSON)."""
    params = RoutingParams(**cfg.router.model_dump(include=set(RoutingKnobs.model_fields)),
                           model_id=cfg.engine.served_model_id, block_size=cfg.engine.block_size,
                           redis_url=cfg.redis_url, routers=cfg.router.num_router_replicas)
    return RequestRouterConfig(request_router_class=KVAwareRouter, request_router_kwargs=params.model_dump(),
                               request_routing_stats_period_s=STATS_PERIOD_S)


def ingress_options(cfg: ClusterConfig) -> dict[str, Any]:
    return dict(name=INGRESS_DEPLOYMENT, num_replicas=cfg.router.num_router_replicas,
                ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)


def build_app_from_config(cfg: ClusterConfig) -> Application:
    cfg = resolve_gpus(cfg)  # once: the replicas and the ingress see the same resources
    replica = serve.deployment(LLMReplica).options(**replica_options(cfg)).bind(cfg.replica_config())
    return serve.deployment(OpenAIIngress).options(**ingress_options(cfg)).bind(cfg.ingress_config(), replica)


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """Serve's app builder entry point."""
    return build_app_from_config(config_from_args(args))
