"""What an LLMReplica tells the rest of the cluster, as typed records that cross Ray process boundaries unchanged:
routing stats (to every handle's request router), autoscaling stats (to the autoscaling policy in the Serve
controller), replica info (`model_info`: to the ingress and `llm-cluster status`) and replica stats (`stats`: to
status and the benchmarks).

Serve carries routing and autoscaling stats as dicts only: `LLMReplica.record_*_stats` hand it `to_serve()`, and
the request router reads them back with `RoutingStats.from_serve`, the one conversion on each side of that edge.
The autoscaling policy reads Serve's per-key series of the same fields (`AUTOSCALING_KEYS`).
"""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

from replicas.engine.protocol import EngineStats


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_serve(self) -> dict[str, Any]:
        """The dict Serve's record_*_stats hooks must return."""
        return self.model_dump()


class RoutingStats(_Record):
    """A replica's load, as request routers weigh it. Coarse values only: Serve re-broadcasts on every change."""
    waiting: int = 0  # requests queued in the engine, or handed to it and not yet taken in by its loop
    running: int = 0
    pending_prefill_tokens: int = 0
    kv_usage: float = 0.0  # rounded to 2 digits
    epoch: str = ""  # this replica process's start: a restarted replica's stats never compare equal

    @classmethod
    def from_serve(cls, stats: Mapping[str, Any] | None) -> "RoutingStats | None":
        """What Serve holds for a replica; None while a new replica has not reported yet."""
        return cls.model_validate(stats) if stats else None


class AutoscalingStats(_Record):
    """A replica's queues, as the autoscaling policy sums them (floats: Serve's time series hold floats)."""
    waiting: float
    running: float
    pending_prefill_tokens: float


AUTOSCALING_KEYS = tuple(AutoscalingStats.model_fields)


class ReplicaInfo(_Record):
    """`LLMReplica.model_info`: the served model, as the ingress's tokenizer needs it, and where the replica is."""
    model_id: str
    max_model_len: int
    block_size: int
    model_path: str
    replica_id: str
    redis_url: str | None = None


class ReplicaStats(EngineStats):
    """`LLMReplica.stats`: the engine's stats and the replica's process."""
    model_config = ConfigDict(extra="forbid")

    replica_id: str
    node_id: str | None = None
    pid: int
    tp_size: int
    draining: bool = False
    torch_threads: int
