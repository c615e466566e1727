"""The replica's config sections: `ReplicaSettings` (the operator's `replicas` section) and `ReplicaConfig`, all
one LLMReplica is built from. `cluster.config.ClusterConfig` composes the sections and derives ReplicaConfig."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from replicas.engine.config import EngineConfig


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
    stall_timeout_s: float = Field(30.0, gt=0, description="Unhealthy if the engine loop has work but has not "
                                   "ticked for this long.")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="Drain time on downscale.")
    max_replicas_per_node: int | None = Field(None, ge=1, description="Hard cap per Ray node (tp_size 1 only: Serve "
                                              "forbids it with placement groups); unset = Serve's default soft SPREAD.")

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _auto_gpus(cls, v):
        return None if isinstance(v, str) and v.strip().lower() == "auto" else v


class ReplicaConfig(_Section):
    """What one LLMReplica needs: its engine, its section, the Redis it publishes KV events to, and how many
    replicas of its deployment may run at once (CPU replicas share the machine's cores among them)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    redis_url: str | None = None
    concurrent_replicas: int = Field(1, ge=0)
