"""ClusterConfig: everything an operator sets, as one typed model.

Sources, later ones win: defaults < YAML file < environment (`LLM_CLUSTER_<SECTION>__<FIELD>`, plus the
well-known `REDIS_URL` and `LLM_CLUSTER_API_KEYS`) < CLI / Serve-args overrides (`section.field=value`).
Errors name the field: `engine.block_size: Input should be a valid integer (got 'abc')`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from replicas.config import ReplicaConfig, ReplicaSettings
from replicas.engine.config import EngineConfig
from router.auth import ENV_VAR as API_KEYS_ENV
from router.config import AutoscalingSettings, IngressConfig, RouterSettings

ENV_PREFIX = "LLM_CLUSTER_"


class ConfigError(ValueError):
    """A bad config value; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterConfig(_Section):
    """The sections of every component (each defined in its own layer), composed: what an operator sets."""
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

    def replica_config(self) -> ReplicaConfig:
        """What each LLMReplica is built from."""
        a = self.autoscaling
        return ReplicaConfig(engine=self.engine, replicas=self.replicas, redis_url=self.redis_url,
                             concurrent_replicas=a.max_replicas if a.enabled else self.replicas.num_replicas)

    def ingress_config(self) -> IngressConfig:
        """What each ingress replica is built from."""
        return IngressConfig(router=self.router, engine=self.engine)

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
    if env.get(API_KEYS_ENV):
        _set_dotted(out, "router.api_keys", [k.strip() for k in env[API_KEYS_ENV].split(",") if k.strip()])
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
