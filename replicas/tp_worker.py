"""Tensor-parallel worker actors of an LLMReplica: ranks 1..tp-1, one Ray actor in each further bundle of the
replica's placement group (rank 0 is the replica actor itself, in bundle 0), and `RayWorkers`, rank 0's
handle on them (injected into the engine by `LLMReplica` inside a placement group).

The actors are children of the replica actor: if the replica dies they die with it, and its shutdown
stops them and kills them. Each is named `<replica id>/tp<rank>` in the `TP_NAMESPACE` namespace.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from replicas.engine.config import EngineConfig
from replicas.engine.parallel import TPWorkers, WorkerRank

log = logging.getLogger("ray.serve")

TP_NAMESPACE = "llm-cluster-tp"


@ray.remote(max_restarts=0)
class TPWorker:
    """One worker rank. `start` joins the group and loads the shard (blocking, concurrently with rank 0), then
    the step loop runs in a thread, so the actor still answers `ping` for the replica's health check."""

    def __init__(self, config_json: str, rank: int):
        self.config = EngineConfig.model_validate_json(config_json)
        self.rank = rank
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, host: str, port: int) -> int:
        worker = WorkerRank(self.config, self.rank, host, port)
        self.thread = threading.Thread(target=self._serve, args=(worker,), name=f"tp-rank{self.rank}", daemon=True)
        self.thread.start()
        return os.getpid()

    def _serve(self, worker: WorkerRank) -> None:
        try:
            worker.serve()
        except BaseException as e:  # noqa: BLE001 - reported through ping
            self.error = e
            log.error("TP rank %d step loop failed: %r", self.rank, e)

    def ping(self) -> int:
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError(f"TP rank {self.rank} is not running its step loop (error: {self.error!r})")
        return self.rank

    def join(self, timeout_s: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout_s)


class RayWorkers(TPWorkers):
    """Worker ranks as TPWorker actors in bundles 1..tp-1 of the current placement group; each asks for
    exactly its bundle's resources."""

    def _host(self) -> str:
        return ray.util.get_node_ip_address()

    def _start(self, host: str, port: int) -> None:
        pg = ray.util.get_current_placement_group()
        if len(pg.bundle_specs) < self.config.tp_size:
            raise RuntimeError(f"tp_size={self.config.tp_size} needs as many placement group bundles; "
                               f"got {len(pg.bundle_specs)}")
        tag = _replica_tag()
        self.actors = []
        for rank in range(1, self.config.tp_size):
            bundle = pg.bundle_specs[rank]
            self.actors.append(TPWorker.options(
                name=f"{tag}/tp{rank}", namespace=TP_NAMESPACE,
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=rank),
            ).remote(self.config.model_dump_json(), rank))
        self._started = [a.start.remote(host, port) for a in self.actors]

    def _wait_ready(self, timeout_s: float) -> None:
        ray.get(self._started, timeout=timeout_s)

    def _startup_errors(self) -> str:
        ready, _ = ray.wait(self._started, num_returns=len(self._started), timeout=0)
        errs = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - collected for the join error
                errs.append(f"; {type(e).__name__}: {e}")
        return "".join(errs)

    def _ping(self, timeout_s: float) -> None:
        # ActorDiedError propagates as is: the replica's health check fails on the first dead worker.
        ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)

    def _reap(self, wait_s: float) -> None:
        if wait_s > 0:
            try:
                ray.get([a.join.remote(wait_s) for a in self.actors], timeout=wait_s + 5)
            except Exception:  # noqa: BLE001 - killed below either way
                log.warning("TP workers did not stop cleanly", exc_info=True)
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _replica_tag() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - a placement group outside Serve
        return f"local-{uuid.uuid4().hex[:8]}"
