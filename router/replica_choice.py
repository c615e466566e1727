"""ReplicaChooser: the replica-choice policies and this router's own load bookkeeping, free of Serve types.

Policies (`router.policy`):
  round_robin  candidates in turn.
  pow2         two random candidates; the one with less queued work.
  prefix       one prefix-index lookup over all candidates, then per candidate
                   score = prefix_weight * cached prompt tokens - queued work (in tokens)
               queued work = pending prefill tokens + request_cost_tokens * requests (waiting + running).
               A cached prefix therefore wins until waiting behind its holder costs more than the
               prefill it saves. Hot spots: a candidate running more than
               max(balance_slack, balance_ratio * mean) requests above the candidates' mean is ranked
               behind every candidate within that bound (per candidate, never fleet-wide). The bound is
               on the mean, as the balance target is (busiest <= 1.5x the mean in-flight): measured from
               the least-loaded candidate it passed holders over at low load, where a few requests more
               cost far less than re-prefilling a conversation's history elsewhere.
Ties break at random.

Load = each replica's routing stats (`LLMReplica.record_routing_stats`, refreshed every stats period)
plus this chooser's own assignments, counted the moment it decides, so that a burst does not pile onto
one replica before the stats catch up. With several ingress replicas (`routers`), each router's decisions
that the stats do not show yet count `routers` times: the other routers, fed alike by the proxy, are
making as many meanwhile, and without that estimate every router would pile its share of a burst onto
the same cache holder. A slow or absent index (lookup -> None) leaves this chooser's own
recent decisions (`router.recent_routes`) as the prefix estimate, weighed against load the same way; a
prompt it has not routed recently then goes by load alone. When the index answers, the decisions of the
last `index_lag_s` are added to its answer (holders publish only after computing).
Every decision is counted by outcome (replicas.metrics ROUTING_OUTCOMES) in `llmc_routing_decisions_total`
and in `outcomes`. Index lookups that do not answer, and the requests routed without the index because of
them, are counted by reason in this process's totals (`redis_routing_stats`, which the ingress's GET
/metrics and `llm-cluster status` read) as well as in Ray's metrics export; so is the breaker's state.

`router.routing.KVAwareRouter` adapts this to Serve's RequestRouter. Serve ships that module by value
to every process holding a handle; this one travels by reference, so its state (`router_counters`) is
shared by all routers of a process.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections import defaultdict, deque
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, Field

from kvstore.index import PrefixIndex, RedisPrefixIndex
from replicas.engine.hashing import block_hashes, extra_key
from replicas.engine.protocol import GenerationRequest
from replicas.metrics import BREAKER_STATES, MetricsRecorder
from replicas.protocol import RoutingStats
from router.config import RoutingKnobs
from router.recent_routes import RecentRoutes

log = logging.getLogger("ray.serve")

STATS_PERIOD_S = 0.5  # replicas' record_routing_stats period
_NO_STATS = RoutingStats()
METRICS = ("llmc_routing_decisions_total", "llmc_router_prefix_query_tokens_total",
           "llmc_router_prefix_hit_tokens_total", "llmc_router_index_lookup_seconds",
           "llmc_router_index_lookup_failures_total", "llmc_redis_fallbacks_total", "llmc_router_redis_breaker_state")


class RoutingParams(RoutingKnobs):
    """The router's knobs: the operator's (router.config.RoutingKnobs) and what the deployment fills in;
    shipped as `request_router_kwargs` (JSON) by `cluster.app.request_router_config`."""
    model_id: str = Field(description="Served model id: the prefix index namespace and block-hash extra key.")
    block_size: int = Field(16, ge=1)
    redis_url: str | None = None
    redis_breaker_s: float = Field(0.25, gt=0, description="After a failed lookup, route by load this long "
                                   "before asking the index again (a hung Redis then costs one timeout per period).")
    request_cost_tokens: float = Field(16.0, ge=0, description="Queued work of one waiting/running request "
                                       "beyond its pending prefill, in prefill tokens.")
    recent_blocks: int = Field(32768, ge=0, description="Block hashes of this router's own recent decisions "
                               "kept as its prefix estimate for when the index does not answer (0: off).")
    index_lag_s: float = Field(2.0, ge=0, description="How long this router's own decisions count as prefix "
                               "holders beside the index's answer: a replica publishes blocks only after computing "
                               "them (0: the index alone).")
    fresh_s: float = Field(2 * STATS_PERIOD_S, gt=0, description="How long an assignment's prefill counts "
                           "as this router's own at most (a stats refresh from its replica ends it sooner).")
    routers: int = Field(1, ge=1, description="Ingress replicas routing to the same replicas (each has a "
                         "router). A router sees only its own decisions until the replicas' stats report them; "
                         "the others, fed by the same proxy, decide alike meanwhile, so each fresh decision of "
                         "this router stands for `routers` of them.")


class _Assignment:
    __slots__ = ("replica", "tokens", "t", "fresh", "hashes")

    def __init__(self, replica: str, tokens: int, t: float, hashes: Sequence[int]):
        self.replica, self.tokens, self.t, self.fresh, self.hashes = replica, tokens, t, True, hashes


_LIVE: "weakref.WeakSet[ReplicaChooser]" = weakref.WeakSet()
# Serve runs a handle's router on its own loop thread; the ingress reads from its own: a chooser joining
# while another thread walks _LIVE would break the walk.
_LIVE_LOCK = threading.Lock()


def _live() -> list["ReplicaChooser"]:
    with _LIVE_LOCK:
        return list(_LIVE)


def router_counters() -> collections.Counter:
    """Decisions by outcome, summed over the choosers alive in this process (tests, debugging)."""
    out: collections.Counter = collections.Counter()
    for c in _live():
        out.update(c.outcomes)
    return out


Breaker = Literal["closed", "half_open", "open"]


class RedisRoutingStats(BaseModel):
    """The request routers of one process, for one model, on Redis: what the ingress's GET /metrics shows
    and what `llm-cluster status` asks each ingress replica for (`OpenAIIngress.redis_routing`)."""
    model_id: str
    pid: int
    replica_id: str | None = Field(None, description="The ingress replica that answered (set by the ingress).")
    breaker: Breaker | None = Field(None, description="The most open breaker of this process's routers for "
                                    "the model; None: none has opened the index yet (or there is none).")
    lookup_failures: dict[str, int] = Field(default_factory=dict, description="Index lookups that did not "
                                            "answer, by reason (replicas.metrics LOOKUP_FAILURE_REASONS).")
    fallbacks: dict[str, int] = Field(default_factory=dict, description="Requests routed without the index "
                                      "because it did not answer, by reason (REDIS_FALLBACK_REASONS).")


class _RedisTally:
    """This process's lookup failures and fallbacks by (model, reason). Module state, so the totals outlive
    any one chooser (Serve may build a handle's router again) and are only ever added to, as counters must."""

    def __init__(self):
        self._lock = threading.Lock()  # written on the router's loop thread, read from the ingress's
        self._failures: collections.Counter = collections.Counter()
        self._fallbacks: collections.Counter = collections.Counter()

    def lookup_failed(self, model_id: str, reason: str) -> None:
        with self._lock:
            self._failures[(model_id, reason)] += 1

    def fell_back(self, model_id: str, reason: str) -> None:
        with self._lock:
            self._fallbacks[(model_id, reason)] += 1

    def totals(self, model_id: str) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return ({r: n for (m, r), n in self._failures.items() if m == model_id},
                    {r: n for (m, r), n in self._fallbacks.items() if m == model_id})


_REDIS_TALLY = _RedisTally()
_BREAKER_ORDER = ("closed", "half_open", "open")


def redis_routing_stats(model_id: str) -> RedisRoutingStats:
    """Lookup failures, fallbacks and breaker state of this process's request routers for `model_id`."""
    failures, fallbacks = _REDIS_TALLY.totals(model_id)
    states = [s for c in _live() if c.params.model_id == model_id and (s := c.breaker_state()) in _BREAKER_ORDER]
    return RedisRoutingStats(model_id=model_id, pid=os.getpid(), lookup_failures=failures, fallbacks=fallbacks,
                             breaker=max(states, key=_BREAKER_ORDER.index, default=None))


class ReplicaChooser:
    def __init__(self, params: RoutingParams, index: "PrefixIndex | None" = None, metrics=None):
        """`index` and `metrics` (a replicas.metrics.MetricsRecorder) are for tests; by default a
        RedisPrefixIndex on `redis_url` is made on first use (on the caller's loop, where its
        connections live) and metrics go to Ray's exporter."""
        self.params = params
        self._index = index
        self._extra = extra_key(params.model_id)
        self._rr = itertools.count(random.randrange(1 << 16))  # routers don't all start at replica 0
        self._assigned: dict[str, _Assignment] = {}  # request id -> where this chooser sent it
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._fresh_tokens: defaultdict[str, int] = defaultdict(int)
        self._fresh_reqs: defaultdict[str, int] = defaultdict(int)  # assignments the stats do not show yet
        self._fresh: deque[_Assignment] = deque()
        self._stats_seen: dict[str, Any] = {}
        self._recent = RecentRoutes(params.recent_blocks)
        self._replica_set: frozenset[str] = frozenset()
        self.outcomes: collections.Counter = collections.Counter()
        self._warmed = False
        self._warming: asyncio.Future | None = None  # held: the loop keeps only weak references to tasks
        self._index_unusable = False  # redis_url was set but no index could be made from it
        self._breaker_recorded: str | None = None
        self._metrics = metrics if metrics is not None else _recorder()
        with _LIVE_LOCK:
            _LIVE.add(self)

    # ---------------------------------------------------------------- the decision

    async def choose(self, replica_ids: Sequence[str], stats: Sequence[RoutingStats | None],
                     req: GenerationRequest | None = None, request_id: str | None = None) -> list[int]:
        """Candidate indices, best first. With `request_id` the best one is recorded as this
        request's assignment until `completed(request_id)` (or `moved`)."""
        n = len(replica_ids)
        policy = self.params.policy
        held: dict[str, int] | None = None  # None: no lookup made (policy, call) or the index failed
        hashes: Sequence[int] = ()
        local = False  # held comes from this chooser's own recent decisions
        if policy == "prefix" and req is None and not self._warmed:
            self._warm()
        if policy == "round_robin":
            i = next(self._rr) % n
            order = [*range(i, n), *range(i)]
        else:
            if policy == "prefix" and req is not None:
                hashes = req.block_hashes
                if hashes is None:  # the ingress normally sends them; hash here rather than route blind
                    extra = extra_key(self.params.model_id, req.cache_salt) if req.cache_salt else self._extra
                    hashes = block_hashes(req.prompt_token_ids, self.params.block_size, extra)
                held = await self._lookup(hashes, replica_ids)
            # Loads are read after the lookup's await, so that decisions racing on the loop each see
            # the assignments the others made.
            now = time.monotonic()
            if held is None and hashes:
                held = self._recent.held(hashes, replica_ids) or None
                local = held is not None
            elif hashes and self.params.index_lag_s > 0:  # what the holders have not published yet
                for rid, blocks in self._recent.held(hashes, replica_ids, now - self.params.index_lag_s).items():
                    if blocks > held.get(rid, 0):
                        held[rid] = blocks
            self._expire(now)
            reqs, work = self._loads(replica_ids, stats)
            order = self._pow2(work) if policy == "pow2" and n > 1 else self._rank(replica_ids, reqs, work, held or {})
        if req is not None:
            best = replica_ids[order[0]]
            if hashes:  # only the prefix policy hashes, after reading `now`
                self._recent.record(hashes, best, now)
            if request_id is not None:
                self._assign(request_id, best, req, held or {}, hashes)
            self._record(req, best, held, local)
        return order

    def _rank(self, ids: Sequence[str], reqs: list[float], work: list[float], held: dict[str, int]) -> list[int]:
        p = self.params
        mean = sum(reqs) / len(reqs)
        bound = mean + max(p.balance_slack, p.balance_ratio * mean)
        gain = p.prefix_weight * p.block_size
        keys = [(reqs[i] <= bound, gain * held.get(ids[i], 0) - work[i], random.random()) for i in range(len(ids))]
        return sorted(range(len(ids)), key=keys.__getitem__, reverse=True)

    @staticmethod
    def _pow2(work: list[float]) -> list[int]:
        i, j = random.sample(range(len(work)), 2)
        if work[j] < work[i]:
            i, j = j, i
        return [i, j, *(k for k in range(len(work)) if k != i and k != j)]

    def _loads(self, ids: Sequence[str], stats: Sequence[RoutingStats | None]) -> tuple[list[float], list[float]]:
        """(requests, queued work in tokens) per candidate."""
        cost = self.params.request_cost_tokens
        others = self.params.routers - 1
        reqs, work = [], []
        for rid, s in zip(ids, stats):
            s = s or _NO_STATS  # a new replica that has not reported yet
            # max, not sum: once the stats catch up they include this chooser's own requests.
            r = max(s.waiting + s.running, self._inflight.get(rid, 0))
            fresh_tokens = self._fresh_tokens.get(rid, 0)
            if others:  # the other routers' decisions the stats do not show yet, estimated from ours
                r += others * self._fresh_reqs.get(rid, 0)
                fresh_tokens *= self.params.routers
            reqs.append(r)
            work.append(max(s.pending_prefill_tokens, fresh_tokens) + cost * r)
        return reqs, work

    async def _lookup(self, hashes: Sequence[int], replica_ids: Sequence[str]) -> dict[str, int] | None:
        if not hashes:
            return {}
        index = self._get_index()
        if index is None:
            if self._index_unusable:
                self._fell_back("error")
            return None
        t0 = time.perf_counter()
        held = await index.lookup(self.params.model_id, hashes, list(replica_ids))
        elapsed = time.perf_counter() - t0
        if held is None:
            # The index says why (read before any await: the next lookup may overwrite it); one that does
            # not (a test double) is judged by how long it took.
            reason = getattr(index, "last_failure", None) or (
                "timeout" if elapsed >= 0.8 * self.params.redis_timeout_ms / 1000 else "error")
            _REDIS_TALLY.lookup_failed(self.params.model_id, reason)
            if self._metrics is not None:
                self._metrics.inc("llmc_router_index_lookup_failures_total", model=self.params.model_id,
                                  reason=reason)
            self._fell_back(reason)
        elif self._metrics is not None:
            self._metrics.observe("llmc_router_index_lookup_seconds", elapsed, model=self.params.model_id)
        self._record_breaker()
        return held

    def _fell_back(self, reason: str) -> None:
        """This request is routed without the index (by load, or on this router's recent decisions)."""
        _REDIS_TALLY.fell_back(self.params.model_id, reason)
        if self._metrics is not None:
            self._metrics.inc("llmc_redis_fallbacks_total", component="router", reason=reason)

    def breaker_state(self) -> str | None:
        """The index's breaker ("closed", "half_open", "open"); None before the index is opened."""
        fn = getattr(self._index, "breaker_state", None)
        return fn() if fn is not None else None

    def _record_breaker(self) -> None:
        # Ray's copy follows the lookups (an open breaker turns half-open with time alone, which only the
        # next lookup sees); the ingress's GET /metrics reads the state itself at every scrape.
        state = self.breaker_state()
        if state != self._breaker_recorded and state in BREAKER_STATES and self._metrics is not None:
            self._breaker_recorded = state
            self._metrics.set("llmc_router_redis_breaker_state", BREAKER_STATES[state], model=self.params.model_id)

    def _warm(self) -> None:
        """Open the index on this loop (where its connections live) and warm it in the background, at the
        first call that needs no lookup: the ingress asks a replica for model_info before any request
        arrives. (Not at a request's own lookup: a warm-up racing it for a connection only slows it.)"""
        self._warmed = True
        index = self._get_index()
        if index is not None:
            self._warming = asyncio.ensure_future(index.warm())

    def _get_index(self) -> "PrefixIndex | None":
        if self._index is None and self.params.redis_url:
            try:
                self._index = RedisPrefixIndex(self.params.redis_url, timeout_s=self.params.redis_timeout_ms / 1000,
                                               breaker_s=self.params.redis_breaker_s)
            except Exception as e:  # noqa: BLE001 — a bad URL must not fail requests: route by load
                log.warning("prefix index unavailable (%r): routing by load only", e)
                self._index_unusable = True
                self.params = self.params.model_copy(update={"redis_url": None})
        return self._index

    def _record(self, req: GenerationRequest, rid: str, held: dict[str, int] | None, local: bool) -> None:
        policy = self.params.policy
        if policy != "prefix":
            outcome = "no_lookup"
        elif held is None:
            outcome = "index_fallback"
        elif local:
            outcome = "local_fallback"
        else:
            mine = held.get(rid, 0)
            outcome = ("load_override" if max(held.values(), default=0) > mine
                       else "cache_hit" if mine else "cache_miss")
        self.outcomes[outcome] += 1
        m = self._metrics
        if m is None:
            return
        m.inc("llmc_routing_decisions_total", policy=policy, outcome=outcome)
        if held is not None and not local:  # the index's predictions only
            m.inc("llmc_router_prefix_query_tokens_total", len(req.prompt_token_ids), policy=policy)
            if held.get(rid):
                m.inc("llmc_router_prefix_hit_tokens_total", held[rid] * self.params.block_size, policy=policy)

    # ---------------------------------------------------------------- own assignments

    def _assign(self, request_id: str, rid: str, req: GenerationRequest, held: dict[str, int],
                hashes: Sequence[int]) -> None:
        self.completed(request_id)  # chosen again (Serve retried): move it
        cached = held.get(rid, 0) * self.params.block_size
        a = _Assignment(rid, max(0, len(req.prompt_token_ids) - cached), time.monotonic(), hashes)
        self._assigned[request_id] = a
        self._inflight[rid] += 1
        self._fresh_tokens[rid] += a.tokens
        self._fresh_reqs[rid] += 1
        self._fresh.append(a)

    def moved(self, request_id: str, rid: str) -> None:
        """The request went to `rid` after all (Serve took a fallback group)."""
        a = self._assigned.get(request_id)
        if a is not None and a.replica != rid:
            self._release(a)
            a.replica, a.fresh = rid, False
            self._inflight[rid] += 1
            if a.hashes:
                self._recent.record(a.hashes, rid, a.t)

    def completed(self, request_id: str) -> None:
        a = self._assigned.pop(request_id, None)
        if a is not None:
            self._release(a)

    def is_assigned(self, request_id: str) -> bool:
        return request_id in self._assigned

    def inflight(self, rid: str) -> int:
        return self._inflight.get(rid, 0)

    def update(self, stats: Mapping[str, RoutingStats | None]) -> None:
        """The replicas now routable, with their routing stats (Serve broadcasts them when they change).
        A replica's new stats include what this chooser sent it before: stop counting that prefill as
        its own. Replicas that are gone lose their counters and their recent decisions."""
        for rid, s in stats.items():
            if s and s != self._stats_seen.get(rid):
                self._stats_seen[rid] = s
                if self._fresh_reqs.get(rid):
                    for a in self._fresh:
                        if a.fresh and a.replica == rid:
                            a.fresh = False
                    self._fresh_tokens[rid] = 0
                    self._fresh_reqs[rid] = 0
        for table in (self._inflight, self._fresh_tokens, self._fresh_reqs, self._stats_seen):
            for rid in [k for k in table if k not in stats]:
                del table[rid]
        if not self._replica_set.issubset(stats):  # a replica left (stats refreshes come far more often)
            self._recent.retain(stats)
        self._replica_set = frozenset(stats)

    def _release(self, a: _Assignment) -> None:
        self._inflight[a.replica] = max(0, self._inflight[a.replica] - 1)
        if a.fresh:
            a.fresh = False
            self._fresh_tokens[a.replica] -= a.tokens
            self._fresh_reqs[a.replica] -= 1

    def _expire(self, now: float) -> None:
        horizon = now - self.params.fresh_s
        while self._fresh and self._fresh[0].t < horizon:
            a = self._fresh.popleft()
            if a.fresh:
                a.fresh = False
                self._fresh_tokens[a.replica] -= a.tokens
                self._fresh_reqs[a.replica] -= 1


def _recorder():
    try:
        return MetricsRecorder(METRICS)
    except Exception as e:  # noqa: BLE001 — metrics are best effort, routing is not
        log.warning("router metrics unavailable: %r", e)
        return None
