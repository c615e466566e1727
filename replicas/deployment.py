"""LLMReplica: the Serve deployment that owns one engine (and, with tp_size > 1, its TP worker actors).

Its Serve options (resources, placement group, health checks, router, autoscaling) are set in one
place only: `cluster.app`. This class is the replica's behaviour: stream generations, report stats
for routing and autoscaling, and say when it is unhealthy.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import AsyncIterator

import ray
from ray import serve

from kvstore.index import RedisPrefixIndex
from kvstore.publisher import KVEventPublisher
from replicas.config import ReplicaConfig
from replicas.engine.model_prep import resolve_engine_config
from replicas.engine.protocol import GenerationChunk, GenerationRequest
from replicas.metrics import ReplicaMetrics
from replicas.protocol import AutoscalingStats, ReplicaInfo, ReplicaStats, RoutingStats

log = logging.getLogger("ray.serve")


FAULT_INJECTION_ENV = "LLM_CLUSTER_FAULT_INJECTION"
MIN_STREAM_PAUSE_S = 0.002  # shorter than a decode step: pacing would coalesce nothing


class ReplicaUnhealthy(RuntimeError):
    pass


class LLMReplica:
    def __init__(self, config: ReplicaConfig):
        # Here, not at module level: torch and transformers load only where an engine runs, not in the driver
        # that builds the app.
        from replicas.engine.async_engine import AsyncLLMEngine

        self.config = config
        self.engine_config = resolve_engine_config(config.engine)
        self._device = _engine_device(self.engine_config)
        if self._device is not None and self._device.type == "cpu":
            _set_torch_threads(cpu_threads(config))
        self.replica_id = _replica_unique_id()
        self.epoch = f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:6]}"
        self.metrics = ReplicaMetrics(self.engine_config.served_model_id, self.replica_id,
                                      lambda: self.engine.stats().model_dump())
        # KV block events -> the prefix index the routers read (only when Redis is configured).
        self.publisher = _kv_publisher(config, self.engine_config, self.replica_id, self.epoch,
                                       self.metrics.redis_fallback)
        hooks = {} if self.publisher is None else {"on_blocks_stored": self.publisher.on_blocks_stored,
                                                   "on_blocks_evicted": self.publisher.on_blocks_evicted}
        self.engine = AsyncLLMEngine(self.engine_config, tp_workers=_tp_workers(), **hooks)
        if self.publisher is not None:
            self.publisher.full_set = self.engine.cached_block_hashes
            self._publisher_task = _start_on_running_loop(self.publisher.start())
        self._draining = False
        self._inflight = 0  # generate() streams open on this replica: work the engine may not list yet
        self.metrics.start()
        log.info("replica %s ready: model=%s blocks=%s", self.replica_id, self.engine_config.served_model_id,
                 self.engine.stats().kv_blocks_total)

    # ------------------------------------------------------------------ serving

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request. Cancellation (client gone) aborts it and frees its blocks.

        The first chunk leaves at once (TTFT); later ones are paced by `_stream_pause`: while this stream
        waits, the engine's tokens for it pile up and the next read takes them as one chunk."""
        self._inflight += 1
        stream = self.engine.generate(request)
        first = True
        try:
            async for chunk in stream:
                if first:  # the router's x-replica-id: once per attempt, not on every chunk
                    chunk.replica_id, first = self.replica_id, False
                yield chunk
                if chunk.usage is None:
                    pause = self._stream_pause()
                    if pause:
                        await asyncio.sleep(pause)
        finally:
            self._inflight -= 1
            await stream.aclose()  # at once, not at garbage collection: aborts the request, frees its blocks

    def _stream_pause(self) -> float:
        """Seconds a stream waits between chunks: open streams / the replica's chunk budget, so a full
        replica sends `stream_chunks_per_s` chunks a second in all however many streams it holds (each
        chunk costs a Ray object per hop and the replica's GIL, which its engine loop needs). Below
        MIN_STREAM_PAUSE_S it is not worth a timer: tokens go out as they come."""
        budget = self.config.replicas.stream_chunks_per_s
        pause = self._inflight / budget if budget else 0.0
        return pause if pause >= MIN_STREAM_PAUSE_S else 0.0

    async def model_info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(model_id=e.model_id, max_model_len=e.max_model_len, block_size=e.block_size,
                           model_path=self.engine_config.model, replica_id=self.replica_id,
                           redis_url=self.config.redis_url)  # for `llm-cluster status` (internal handle calls only)

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(**self.engine.stats().model_dump(), replica_id=self.replica_id, node_id=_node_id(),
                            pid=os.getpid(), tp_size=self.engine_config.tp_size, draining=self._draining,
                            torch_threads=_torch_threads())

    # ------------------------------------------------------------------ Serve hooks

    def _queue(self):
        """(stats, waiting): requests handed to the engine but not yet taken in by its loop count as
        waiting — in a burst they are the queue the scheduler has not seen yet. One definition for
        routing and autoscaling."""
        s = self.engine.stats()
        return s, max(s.num_waiting, self._inflight - s.num_running)

    def routing_stats(self) -> RoutingStats:
        s, waiting = self._queue()
        # Coarse values only: Serve re-broadcasts stats whenever they change.
        return RoutingStats(waiting=waiting, running=s.num_running, pending_prefill_tokens=s.pending_prefill_tokens,
                            kv_usage=round(s.kv_usage, 2), epoch=self.epoch)

    def autoscaling_stats(self) -> AutoscalingStats:
        s, waiting = self._queue()
        return AutoscalingStats(waiting=waiting, running=s.num_running, pending_prefill_tokens=s.pending_prefill_tokens)

    def record_routing_stats(self) -> dict:
        return self.routing_stats().to_serve()  # Serve's hook: a dict

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.autoscaling_stats().to_serve()  # Serve's hook: a dict

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s. A broken replica exits its process at once
        instead of raising: Serve would wait for 3 failed checks, then drain it for up to
        graceful_shutdown_timeout_s while its streams hang. Exiting ends those streams with
        ActorDiedError (the router resumes them on another replica) and Serve sees the actor crashed,
        so it leaves routing and is replaced on the next controller tick."""
        problem = self._engine_problem() or await self._device_problem() or await self._tp_worker_problem()
        if problem:
            log.error("replica %s unhealthy, exiting so Serve replaces it: %s", self.replica_id, problem)
            _exit_process()
            raise ReplicaUnhealthy(problem)  # only reached where exiting is patched out (unit tests)

    def _engine_problem(self) -> str | None:
        if not self.engine.is_alive():
            return "engine loop thread is dead"
        idle_for = time.monotonic() - self.engine.heartbeat
        if idle_for > self.config.replicas.stall_timeout_s:
            s = self.engine.stats()
            if s.num_running or s.num_waiting or self._inflight:
                return (f"engine loop has not ticked for {idle_for:.1f}s with work "
                        f"(running={s.num_running} waiting={s.num_waiting} streams={self._inflight})")
        return None

    async def _device_problem(self) -> str | None:
        """CUDA: a sticky error or a hung device fails a tiny alloc + synchronize (in a thread: a hung
        synchronize must not block the replica's event loop)."""
        if self._device is None or self._device.type != "cuda":
            return None
        import torch

        def probe():
            torch.empty(1, device=self._device).add_(1)
            torch.cuda.synchronize(self._device)
        try:
            await asyncio.wait_for(asyncio.to_thread(probe), self._probe_timeout_s())
        except asyncio.TimeoutError:
            return f"device {self._device} did not synchronize within {self._probe_timeout_s():.1f}s"
        except Exception as e:  # noqa: BLE001 - any CUDA error here means the device is unusable
            return f"device {self._device} check failed: {type(e).__name__}: {e}"
        return None

    async def _tp_worker_problem(self) -> str | None:
        """Hook for tensor parallelism: an engine with TP workers exposes `check_workers(timeout_s)`,
        which pings every worker actor and raises if one is dead or does not answer in time."""
        check = getattr(self.engine, "check_workers", None)
        if check is None:
            return None
        try:
            await asyncio.wait_for(asyncio.to_thread(check, self._probe_timeout_s()), self._probe_timeout_s() + 1)
        except asyncio.TimeoutError:
            return "TP workers did not answer the health ping"
        except Exception as e:  # noqa: BLE001 - ActorDiedError and friends
            return f"TP worker check failed: {type(e).__name__}: {e}"
        return None

    def _probe_timeout_s(self) -> float:
        # Leave Serve's own health-check timeout room to receive our answer.
        return max(0.5, self.config.replicas.health_check_timeout_s / 2)

    def _inject_fault(self, kind: str) -> str:
        """Tests only, refused unless LLM_CLUSTER_FAULT_INJECTION=1 in the replica's environment.
        "stall", "crash" or "slow" (AsyncLLMEngine.inject_fault; "slow" makes streams last long enough to
        watch a drain). Returns this replica's id."""
        if os.environ.get(FAULT_INJECTION_ENV) != "1":
            raise PermissionError(f"fault injection is off (set {FAULT_INJECTION_ENV}=1)")
        self.engine.inject_fault(kind)
        log.warning("replica %s: injected fault %r", self.replica_id, kind)
        return self.replica_id

    def __del__(self):
        # Serve calls this on replica shutdown (downscale, redeploy): stop publishing (its entries are
        # dropped from the index; if the loop ends first they expire with the heartbeat), then the engine.
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop()
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            self._publisher_task = _start_on_running_loop(publisher.stop())
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _tp_workers():
    """How a TP engine runs its worker ranks: Ray actors in this replica's placement group (under Serve); None
    (the engine's default, local processes) for a replica built outside Ray."""
    if ray.is_initialized() and ray.util.get_current_placement_group() is not None:
        from replicas.tp_worker import RayWorkers  # here: it loads torch, like the engine (see __init__)
        return RayWorkers
    return None


def _exit_process() -> None:
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    os._exit(1)


def _engine_device(cfg):
    try:
        from replicas.engine.model_runner import resolve_device_dtype
        return resolve_device_dtype(cfg)[0]
    except Exception:  # noqa: BLE001 - no device check rather than no replica
        return None


def cpu_threads(config: ReplicaConfig, env_vars: dict | None = None, cores: int | None = None) -> int | None:
    """Torch threads of a CPU replica; None leaves what Ray set (OMP_NUM_THREADS = the actor's num_cpus).

    Ray's default would run the embedded model on one thread of a 2-core box (replicas.num_cpus defaults to 1,
    a reservation, not a speed setting): by default a replica takes its share of the machine's cores among the
    replicas this config can run at once. An OMP_NUM_THREADS the operator put in the runtime env wins."""
    r = config.replicas
    if r.torch_threads is not None:
        return r.torch_threads
    if "OMP_NUM_THREADS" in (_runtime_env_vars() if env_vars is None else env_vars):
        return None
    cores = cores or _usable_cores()
    return max(int(r.num_cpus) or 1, cores // max(1, config.concurrent_replicas * config.engine.tp_size))


def _usable_cores() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def _runtime_env_vars() -> dict:
    if not ray.is_initialized():  # outside Ray (unit tests): the process's own environment
        return dict(os.environ)
    try:
        return dict(ray.get_runtime_context().runtime_env.get("env_vars") or {})
    except Exception:  # noqa: BLE001 - no runtime env: nothing set
        return {}


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _set_torch_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)
        log.info("torch threads: %d", n)


def _kv_publisher(config: ReplicaConfig, engine_config, replica_id: str, epoch: str, on_fallback=None):
    """The replica's KVEventPublisher, or None without Redis. Never fails the replica: without a
    publisher the routers just don't see this replica's cache."""
    if not config.redis_url:
        return None
    try:
        return KVEventPublisher(RedisPrefixIndex(config.redis_url), engine_config.served_model_id, replica_id, epoch,
                                on_fallback=on_fallback)
    except Exception as e:  # noqa: BLE001 — e.g. a malformed URL
        log.warning("replica %s: no KV event publishing (%r)", replica_id, e)
        return None


def _start_on_running_loop(coro) -> asyncio.Task | None:
    """Serve runs the constructor and __del__ on the replica's event loop: schedule `coro` there."""
    try:
        return asyncio.get_running_loop().create_task(coro)
    except RuntimeError:  # no running loop (constructed outside Serve): the caller awaits it itself
        coro.close()
        return None


def _replica_unique_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return f"local-{uuid.uuid4().hex[:8]}"


def _node_id() -> str | None:
    if not ray.is_initialized():  # outside Ray (unit tests): asking would start a local Ray instance
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
