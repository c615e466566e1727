"""The router layer's config sections: `RouterSettings` (the operator's `router` section: ingress and replica
choice), `AutoscalingSettings` (the `autoscaling` section, read by the policy in `router.autoscaling`) and
`IngressConfig`, all one ingress is built from. `cluster.config.ClusterConfig` composes them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from replicas.engine.config import EngineConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Section):
    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_waiting_per_replica: float = Field(4.0, gt=0, description="Waiting requests one replica should hold.")
    target_prefill_tokens_per_replica: float = Field(8192, gt=0,
                                                     description="Pending prefill tokens one replica should hold.")
    target_running_fraction: float = Field(0.8, gt=0, le=1,
                                           description="Running sequences / max_num_seqs at the target.")
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
    http_proxy: Literal["serve", "haproxy"] = Field(
        "serve", description="What answers on host:port in front of the ingress replicas. `serve`: Ray Serve's "
        "Python proxy actor. `haproxy`: Ray Serve's HAProxy ingress (HAProxy on host:port, each ingress replica "
        "serving HTTP itself): one process and one Ray streaming hop fewer, so less latency per request, but "
        "each ingress replica then does the HTTP work too: give it more `num_router_replicas` under many "
        "streams (docs/benchmarks.md). Applies where `llm-cluster serve` starts the Ray node; a cluster it "
        "joins keeps its own setting.")
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


class IngressConfig(_Section):
    """What one ingress replica needs: its section and the engine config of the replicas it serves (the
    model id it answers to)."""
    router: RouterSettings = Field(default_factory=RouterSettings)
    engine: EngineConfig = Field(default_factory=EngineConfig)
