"""LLMReplica: the Serve deployment that owns one engine (and, with tp_size > 1, its TP worker actors).

Its Serve options (resources, placement group, health checks, router, autoscaling) are set in one
place only: `cluster.app`. This class is the replica's behaviour: stream generations, report stats
for routing and autoscaling, and say when it is unhealthy.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import AsyncIterator

from cluster.config import ClusterConfig
from replicas.protocol import EngineError, GenerationChunk, GenerationRequest

log = logging.getLogger("ray.serve")


class ReplicaUnhealthy(RuntimeError):
    pass


class LLMReplica:
    def __init__(self, config: ClusterConfig):
        from cluster.model_prep import resolve_engine_config
        from replicas.engine.async_engine import AsyncLLMEngine

        self.config = config
        self.engine_config = resolve_engine_config(config.engine)
        self.replica_id = _replica_unique_id()
        self.epoch = f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:6]}"
        self.engine = AsyncLLMEngine(self.engine_config)
        self._draining = False
        log.info("replica %s ready: model=%s blocks=%s", self.replica_id, self.engine_config.served_model_id,
                 self.engine.stats().kv_blocks_total)

    # ------------------------------------------------------------------ serving

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request. Cancellation (client gone) aborts it and frees its blocks."""
        async for chunk in self.engine.generate(request):
            yield chunk

    async def model_info(self) -> dict:
        e = self.engine
        return {"model_id": e.model_id, "max_model_len": e.max_model_len, "block_size": e.block_size,
                "model_path": self.engine_config.model, "replica_id": self.replica_id}

    async def stats(self) -> dict:
        s = self.engine.stats().model_dump()
        s.update(replica_id=self.replica_id, node_id=_node_id(), pid=os.getpid(),
                 tp_size=self.engine_config.tp_size, draining=self._draining)
        return s

    # ------------------------------------------------------------------ Serve hooks

    def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        # Coarse values only: Serve re-broadcasts stats whenever they change.
        return {"waiting": s.num_waiting, "running": s.num_running,
                "pending_prefill_tokens": s.pending_prefill_tokens,
                "kv_usage": round(s.kv_usage, 2), "epoch": self.epoch}

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {"waiting": float(s.num_waiting), "running": float(s.num_running),
                "pending_prefill_tokens": float(s.pending_prefill_tokens)}

    async def check_health(self) -> None:
        stall = self.config.replicas.stall_timeout_s
        s = self.engine.stats()
        idle_for = time.monotonic() - self.engine.heartbeat
        if idle_for > stall and (s.num_running or s.num_waiting):
            raise ReplicaUnhealthy(f"engine loop has not ticked for {idle_for:.1f}s with work queued")
        if not self.engine.is_alive():
            raise ReplicaUnhealthy("engine loop thread is dead")

    def __del__(self):
        # Serve calls this on replica shutdown (downscale, redeploy): stop the engine thread.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_unique_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return f"local-{uuid.uuid4().hex[:8]}"


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
