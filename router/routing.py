"""KVAwareRouter: the Ray Serve RequestRouter that picks the LLMReplica for each request.

Policies (`router.policy`):
  round_robin  candidates in turn.
  pow2         two random candidates; the one with less queued work.
  prefix       one prefix-index lookup over all candidates, then per candidate
                   score = prefix_weight * cached prompt tokens - queued work (in tokens)
               queued work = pending prefill tokens + request_cost_tokens * requests (waiting + running).
               A cached prefix therefore wins until waiting behind its holder costs more than the
               prefill it saves. Hot spots: a candidate running more than
               max(balance_slack, balance_ratio * mean) requests above the least-loaded candidate is
               ranked behind every candidate within that bound (per candidate, never fleet-wide).
Ties break at random. The answer is ranked groups `[[best], [the rest, best first]]` so that Serve
falls back when the best replica is full.

Load = each replica's routing stats (`LLMReplica.record_routing_stats`, refreshed every
`stats_period_s`) plus this router's own assignments, counted the moment it decides, so that a burst
does not pile onto one replica before the stats catch up. Several routers exist (the proxy, each
ingress replica, drivers): each keeps its own assignments; they share the prefix index through Redis.
A slow or absent index (lookup -> None) means load-only choice, counted in `fallbacks`.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
import weakref
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvstore.hashing import block_hashes, extra_key
from replicas.protocol import GenerationRequest

if TYPE_CHECKING:
    from cluster.config import ClusterConfig
    from kvstore.index import PrefixIndex

log = logging.getLogger("ray.serve")

STATS_PERIOD_S = 0.5  # replicas' record_routing_stats period


class RoutingParams(BaseModel):
    """The router's knobs; shipped as `request_router_kwargs` (JSON) from `router_config(cfg)`."""
    model_config = ConfigDict(extra="forbid")

    policy: Literal["round_robin", "pow2", "prefix"] = "prefix"
    model_id: str = Field(description="Served model id: the prefix index namespace and block-hash extra key.")
    block_size: int = Field(16, ge=1)
    redis_url: str | None = None
    redis_timeout_ms: float = Field(5.0, gt=0)
    prefix_weight: float = Field(1.0, ge=0, description="Value of one cached token vs one queued token.")
    request_cost_tokens: float = Field(16.0, ge=0, description="Queued work of one waiting/running request "
                                       "beyond its pending prefill, in prefill tokens.")
    balance_slack: float = Field(2.0, ge=0, description="Requests a candidate may run above the least-loaded "
                                 "one and still be preferred for its cache ...")
    balance_ratio: float = Field(0.5, ge=0, description="... or this fraction of the mean, if larger.")
    fresh_s: float = Field(2 * STATS_PERIOD_S, gt=0, description="How long an assignment's prefill counts "
                           "as this router's own (after that the replica's stats include it).")


def router_config(cfg: "ClusterConfig"):
    """The LLMReplica deployment's RequestRouterConfig (imported by cluster.app)."""
    from ray.serve.config import RequestRouterConfig

    from cluster.model_prep import served_model_id

    params = RoutingParams(policy=cfg.router.policy, model_id=served_model_id(cfg.engine),
                           block_size=cfg.engine.block_size, redis_url=cfg.redis_url,
                           redis_timeout_ms=cfg.router.redis_timeout_ms, prefix_weight=cfg.router.prefix_weight)
    return RequestRouterConfig(request_router_class=KVAwareRouter, request_router_kwargs=params.model_dump(),
                               request_routing_stats_period_s=STATS_PERIOD_S)


class _Assignment:
    __slots__ = ("replica", "tokens", "t", "fresh")

    def __init__(self, replica: str, tokens: int, t: float):
        self.replica, self.tokens, self.t, self.fresh = replica, tokens, t, True


class _Load:
    __slots__ = ("requests", "work")

    def __init__(self, requests: float, work: float):
        self.requests, self.work = requests, work


_LIVE_ROUTERS: "weakref.WeakSet[KVAwareRouter]" = weakref.WeakSet()


def router_counters() -> dict[str, int]:
    """Decisions and index fallbacks summed over the routers alive in this process (metrics, tests)."""
    out = {"decisions": 0, "fallbacks": 0}
    for r in list(_LIVE_ROUTERS):
        out["decisions"] += r.decisions
        out["fallbacks"] += r.fallbacks
    return out


class KVAwareRouter(RequestRouter):
    def initialize_state(self, index: "PrefixIndex | None" = None, **kwargs: Any) -> None:
        """`kwargs` are RoutingParams. `index` is for tests; by default a RedisPrefixIndex on
        `redis_url` is made on first use (on the routing loop, where its connections live)."""
        self.params = RoutingParams.model_validate(kwargs)
        self._index = index
        self._extra = extra_key(self.params.model_id)
        self._rr = itertools.count(random.randrange(1 << 16))  # routers don't all start at replica 0
        self._assigned: dict[str, _Assignment] = {}  # internal request id -> where this router sent it
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._fresh_tokens: defaultdict[str, int] = defaultdict(int)
        self._fresh: deque[_Assignment] = deque()
        self.decisions = 0
        self.fallbacks = 0
        self._fallback_metric = None
        _LIVE_ROUTERS.add(self)

    # ---------------------------------------------------------------- the decision

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        cands = list(candidate_replicas)
        n = len(cands)
        if n == 0:
            return []
        req = _generation_request(pending_request)
        self.decisions += 1
        if n == 1:
            order = [0]
            held: dict[str, int] = {}
        elif self.params.policy == "round_robin":
            i = next(self._rr) % n
            order = [*range(i, n), *range(i)]
            held = {}
        else:
            held = {}
            if self.params.policy == "prefix" and req is not None:
                held = await self._lookup(req, [r.replica_id.unique_id for r in cands])
            # Loads are read after the lookup's await, so that decisions racing on the loop each see
            # the assignments the others made.
            loads = [self._load(r) for r in cands]
            order = self._pow2(loads) if self.params.policy == "pow2" else self._rank(cands, loads, held)
        if req is not None and pending_request is not None:
            self._assign(pending_request, cands[order[0]].replica_id.unique_id, req, held)
        best, rest = order[0], order[1:]
        return [[cands[best]], [cands[i] for i in rest]] if rest else [[cands[best]]]

    def _rank(self, cands: list[RunningReplica], loads: list[_Load], held: dict[str, int]) -> list[int]:
        p = self.params
        reqs = [ld.requests for ld in loads]
        bound = min(reqs) + max(p.balance_slack, p.balance_ratio * sum(reqs) / len(reqs))
        gain = p.prefix_weight * p.block_size
        keys = [(ld.requests <= bound, gain * held.get(r.replica_id.unique_id, 0) - ld.work, random.random())
                for r, ld in zip(cands, loads)]
        return sorted(range(len(cands)), key=keys.__getitem__, reverse=True)

    @staticmethod
    def _pow2(loads: list[_Load]) -> list[int]:
        i, j = random.sample(range(len(loads)), 2)
        if loads[j].work < loads[i].work:
            i, j = j, i
        return [i, j, *(k for k in range(len(loads)) if k != i and k != j)]

    async def _lookup(self, req: GenerationRequest, replica_ids: list[str]) -> dict[str, int]:
        hashes = req.block_hashes
        if hashes is None:  # the ingress normally sends them; hash here rather than route blind
            hashes = block_hashes(req.prompt_token_ids, self.params.block_size, self._extra)
        if not hashes:
            return {}
        index = self._get_index()
        held = None if index is None else await index.lookup(self.params.model_id, hashes, replica_ids)
        if held is None:
            self.fallbacks += 1
            self._count_fallback()
            return {}
        return held

    def _get_index(self) -> "PrefixIndex | None":
        if self._index is None and self.params.redis_url:
            from kvstore.index import RedisPrefixIndex
            try:
                self._index = RedisPrefixIndex(self.params.redis_url, timeout_s=self.params.redis_timeout_ms / 1000)
            except Exception as e:  # noqa: BLE001 — a bad URL must not fail requests: route by load
                log.warning("prefix index unavailable (%r): routing by load only", e)
                self.params = self.params.model_copy(update={"redis_url": None})
        return self._index

    def _count_fallback(self) -> None:
        try:
            if self._fallback_metric is None:
                from ray.util.metrics import Counter
                self._fallback_metric = Counter(
                    "llmc_router_index_fallbacks", description="Prefix routing decisions made on load only "
                    "because the prefix index was slow or unavailable.")
            self._fallback_metric.inc()
        except Exception:  # noqa: BLE001 — metrics are best effort
            pass

    # ---------------------------------------------------------------- load

    def _load(self, replica: RunningReplica) -> _Load:
        rid = replica.replica_id.unique_id
        s = replica.routing_stats or {}  # {} while a new replica has not reported yet
        requests = max(s.get("waiting", 0) + s.get("running", 0), self._inflight.get(rid, 0))
        prefill = s.get("pending_prefill_tokens", 0) + self._fresh_tokens.get(rid, 0)
        return _Load(requests, prefill + self.params.request_cost_tokens * requests)

    def _assign(self, pr: PendingRequest, rid: str, req: GenerationRequest, held: dict[str, int]) -> None:
        iid = pr.metadata.internal_request_id
        cached = held.get(rid, 0) * self.params.block_size
        now = time.monotonic()
        self._expire(now)
        old = self._assigned.pop(iid, None)  # chosen again (Serve retried): move it
        if old is not None:
            self._release(old)
        else:
            # Forget it if the caller gives up before Serve sends it (no completion callback then).
            pr.future.add_done_callback(lambda f: self._drop(iid) if f.cancelled() else None)
        a = _Assignment(rid, max(0, len(req.prompt_token_ids) - cached), now)
        self._assigned[iid] = a
        self._inflight[rid] += 1
        self._fresh_tokens[rid] += a.tokens
        self._fresh.append(a)

    def _release(self, a: _Assignment) -> None:
        self._inflight[a.replica] = max(0, self._inflight[a.replica] - 1)
        if a.fresh:
            a.fresh = False
            self._fresh_tokens[a.replica] -= a.tokens

    def _drop(self, iid: str) -> None:
        a = self._assigned.pop(iid, None)
        if a is not None:
            self._release(a)

    def _expire(self, now: float) -> None:
        horizon = now - self.params.fresh_s
        while self._fresh and self._fresh[0].t < horizon:
            a = self._fresh.popleft()
            if a.fresh:
                a.fresh = False
                self._fresh_tokens[a.replica] -= a.tokens

    # ---------------------------------------------------------------- Serve callbacks

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        # Serve may have taken a fallback group: count the request where it really went.
        a = self._assigned.get(pending_request.metadata.internal_request_id)
        rid = replica_id.unique_id
        if a is not None and a.replica != rid:
            self._release(a)
            a.replica, a.fresh = rid, False
            self._inflight[rid] += 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._drop(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for table in (self._inflight, self._fresh_tokens):
            for rid in [k for k in table if k not in live]:
                del table[rid]


def _generation_request(pr: PendingRequest | None) -> GenerationRequest | None:
    if pr is None:
        return None
    for arg in itertools.chain(pr.args, pr.kwargs.values()):
        if isinstance(arg, GenerationRequest):
            return arg
    return None
