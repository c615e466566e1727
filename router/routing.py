"""KVAwareRouter: the Ray Serve RequestRouter of the LLMReplica deployment (configured by
`cluster.app.request_router_config`).

The choice itself (round_robin / pow2 / prefix against load) is `router.replica_choice.ReplicaChooser`;
this module adapts it to Serve: candidates in, ranked groups `[[best], [the rest, best first]]` out (so
Serve falls back when the best replica is full), and Serve's send/complete callbacks into the chooser's
own load bookkeeping.

One router instance exists per process holding a handle (the proxy, each ingress replica, drivers);
they share the prefix index through Redis. Serve pickles this module by value into each of them:
keep module state and heavy definitions out of it (they live in router.replica_choice).
"""
from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from replicas.engine.protocol import GenerationRequest
from replicas.protocol import RoutingStats
from router.replica_choice import ReplicaChooser, RoutingParams


class KVAwareRouter(RequestRouter):
    def initialize_state(self, index=None, metrics=None, **kwargs: Any) -> None:
        """`kwargs` are RoutingParams; `index` and `metrics` are for tests (see ReplicaChooser)."""
        self.chooser = ReplicaChooser(RoutingParams.model_validate(kwargs), index=index, metrics=metrics)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        cands = candidate_replicas
        if not cands:
            return []
        req = _generation_request(pending_request)
        iid = None
        if req is not None:
            iid = pending_request.metadata.internal_request_id
            if not self.chooser.is_assigned(iid):
                # A caller that gives up before Serve sends the request gets no completion callback.
                pending_request.future.add_done_callback(
                    lambda f: self.chooser.completed(iid) if f.cancelled() else None)
        order = await self.chooser.choose([r.replica_id.unique_id for r in cands],
                                          [RoutingStats.from_serve(r.routing_stats) for r in cands], req, iid)
        return [[cands[order[0]]], [cands[i] for i in order[1:]]] if len(order) > 1 else [[cands[order[0]]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self.chooser.moved(pending_request.metadata.internal_request_id, replica_id.unique_id)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self.chooser.completed(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.chooser.update({r.replica_id.unique_id: RoutingStats.from_serve(r.routing_stats) for r in replicas})


def _generation_request(pr: PendingRequest | None) -> GenerationRequest | None:
    if pr is None:
        return None
    for arg in (*pr.args, *pr.kwargs.values()):
        if isinstance(arg, GenerationRequest):
            return arg
    return None
