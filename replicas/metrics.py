"""ReplicaMetrics: one replica's catalogue metrics (`cluster.metrics`), recorded to Ray's metrics export.

Engine state (queues, KV usage, prefix-cache and preemption totals) is sampled by a small asyncio task on
the replica's event loop every `period_s`: one `engine.stats()` read per second, nothing in the engine
step, and independent of the rate at which Serve polls routing stats. The KV event publisher's Redis
fallbacks are counted as they happen, from the publisher's task on the same loop (never from the engine
thread's block hooks).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from cluster.metrics import EngineStatsExporter, MetricsRecorder

log = logging.getLogger("ray.serve")

PERIOD_S = 1.0


class ReplicaMetrics:
    def __init__(self, model: str, replica_id: str, stats: Callable[[], Mapping[str, Any]], *,
                 period_s: float = PERIOD_S, ray: bool = True, registry=None):
        self.engine = EngineStatsExporter(model, replica_id, ray=ray, registry=registry)
        self._redis = MetricsRecorder(["llmc_redis_fallbacks_total"], ray=ray, registry=registry,
                                      default_labels={"component": "publisher"})
        self._stats = stats
        self.period_s = period_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling on the running loop; without one (constructed outside Serve) it does nothing."""
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="replica-metrics")

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def export(self) -> None:
        """Record one engine stats sample now."""
        self.engine.observe(self._stats())

    def redis_fallback(self, reason: str) -> None:
        """KVEventPublisher's `on_fallback`: one Redis operation given up ("timeout" or "error")."""
        self._redis.inc("llmc_redis_fallbacks_total", reason=reason)

    async def _run(self) -> None:
        failed = False
        while True:
            try:
                self.export()
                failed = False
            except Exception as e:  # noqa: BLE001 - metrics never take the replica down; say so once
                if not failed:
                    log.warning("replica metrics export failed: %r", e)
                failed = True
            await asyncio.sleep(self.period_s)
