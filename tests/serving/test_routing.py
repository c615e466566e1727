"""KVAwareRouter (and its ReplicaChooser) decisions with fake replicas and the in-process prefix index
(no Ray cluster); the config Serve ships to every handle's process."""
from __future__ import annotations

import asyncio
import collections
import itertools
import time

import pytest
from prometheus_client import CollectorRegistry
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from cluster.app import request_router_config
from cluster.config import load_config
from kvstore.index import InMemoryPrefixIndex, RedisPrefixIndex
from replicas.engine.config import EMBEDDED_MODEL
from replicas.engine.hashing import block_hashes, extra_key
from replicas.engine.protocol import GenerationRequest
from replicas.metrics import MetricsRecorder
from replicas.protocol import RoutingStats
from router.recent_routes import RecentRoutes
from router.replica_choice import METRICS, RoutingParams, router_counters
from router.routing import KVAwareRouter
from tests.fixtures.wait import wait_until_async

MODEL = "m"
BS = 4
DEP = DeploymentID(name="LLMReplica", app_name="test")
_ids = itertools.count()


class FakeReplica:
    """What the router reads from Serve's RunningReplica."""

    def __init__(self, uid: str, **stats):
        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DEP)
        self.routing_stats = stats
        self.max_ongoing_requests = 256


def make_router(policy="prefix", index=None, **params) -> KVAwareRouter:
    r = KVAwareRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    r.registry = CollectorRegistry()
    r.initialize_state(index=InMemoryPrefixIndex() if index is None else index, policy=policy,
                       model_id=MODEL, block_size=BS, metrics=MetricsRecorder(METRICS, ray=False, registry=r.registry),
                       **params)
    return r


def metric(router, name: str, **labels) -> float:
    return router.registry.get_sample_value(name, labels) or 0.0


def pending(tokens: list[int], *, with_hashes: bool = True) -> PendingRequest:
    iid = f"req-{next(_ids)}"
    req = GenerationRequest(request_id=iid, prompt_token_ids=tokens,
                            block_hashes=block_hashes(tokens, BS, extra_key(MODEL)) if with_hashes else None)
    return PendingRequest(args=[req], kwargs={},
                          metadata=RequestMetadata(request_id=iid, internal_request_id=iid, call_method="generate"))


async def hold(index, replica: FakeReplica, tokens: list[int], blocks: int | None = None) -> None:
    """Make the index say `replica` caches the first `blocks` blocks of `tokens` (all full ones by default)."""
    rid = replica.replica_id.unique_id
    hashes = block_hashes(tokens, BS, extra_key(MODEL))
    await index.heartbeat(MODEL, rid, "e1", ttl_s=60)
    await index.add(MODEL, rid, "e1", hashes[:blocks])


async def choose(router, replicas, pr, complete=True):
    """One decision; the first group must hold exactly one replica. `complete` finishes the request."""
    groups = await router.choose_replicas(replicas, pr)
    assert len(groups[0]) == 1 and sorted(r.replica_id.unique_id for g in groups for r in g) == \
        sorted(r.replica_id.unique_id for r in replicas)
    best = groups[0][0]
    if complete:
        router.on_request_completed(best.replica_id, pr.metadata.internal_request_id)
    return best.replica_id.unique_id, groups


PROMPT = list(range(100, 126))  # 6 full blocks of 4 + 2 tokens


async def test_longest_prefix_holder_wins_when_load_is_similar():
    index = InMemoryPrefixIndex()
    a, b, c = FakeReplica("a", waiting=1, running=2), FakeReplica("b", waiting=1, running=2), \
        FakeReplica("c", waiting=1, running=3)
    await hold(index, a, PROMPT, 6)
    await hold(index, b, PROMPT, 2)
    router = make_router(index=index)
    for _ in range(20):
        best, groups = await choose(router, [c, b, a], pending(PROMPT))
        assert best == "a"
        assert [r.replica_id.unique_id for r in groups[1]] == ["b", "c"]  # fallbacks ranked too
    assert router.chooser.outcomes == {"cache_hit": 20}
    assert metric(router, "llmc_routing_decisions_total", policy="prefix", outcome="cache_hit") == 20
    assert metric(router, "llmc_router_prefix_hit_tokens_total", policy="prefix") == 20 * 24
    assert metric(router, "llmc_router_prefix_query_tokens_total", policy="prefix") == 20 * len(PROMPT)
    assert metric(router, "llmc_router_index_lookup_seconds_count", model=MODEL) == 20  # answered lookups


async def test_much_more_loaded_holder_loses_but_a_little_more_loaded_one_wins():
    index = InMemoryPrefixIndex()
    a, b = FakeReplica("a", waiting=0, running=1), FakeReplica("b", waiting=0, running=1)
    await hold(index, a, PROMPT, 6)  # saves 24 prefill tokens
    router = make_router(index=index, index_lag_s=0)  # the index's answer alone (b gets PROMPT first)
    a.routing_stats = dict(waiting=1, running=1, pending_prefill_tokens=500)  # queued work >> 24 saved
    assert (await choose(router, [a, b], pending(PROMPT)))[0] == "b"
    a.routing_stats = dict(waiting=0, running=1, pending_prefill_tokens=10)  # 10 queued < 24 saved
    assert (await choose(router, [a, b], pending(PROMPT)))[0] == "a"
    # Per candidate, not fleet-wide: a hot holder is passed over for the next-best holder, not for all.
    c = FakeReplica("c", waiting=0, running=1)
    await hold(index, c, PROMPT, 4)
    a.routing_stats = dict(waiting=8, running=4, pending_prefill_tokens=2000)
    best, groups = await choose(router, [a, b, c], pending(PROMPT))
    assert best == "c" and [r.replica_id.unique_id for r in groups[1]] == ["b", "a"]
    assert router.chooser.outcomes == {"load_override": 2, "cache_hit": 1}


async def test_ties_are_randomised():
    replicas = [FakeReplica(x, waiting=0, running=0) for x in "abc"]
    router = make_router()
    wins = collections.Counter()
    for k in range(300):  # prompts sharing no block: nobody holds any
        wins[(await choose(router, replicas, pending([k, *PROMPT])))[0]] += 1
    assert set(wins) == {"a", "b", "c"} and min(wins.values()) > 60, wins
    assert router.chooser.outcomes == {"cache_miss": 300}


async def test_hot_holder_is_gated_by_load_bound():
    index = InMemoryPrefixIndex()
    long_prompt = list(range(1000, 1400))  # 100 blocks: saving 400 tokens outweighs any queue below
    a, b, c = FakeReplica("a", running=9), FakeReplica("b", running=2), FakeReplica("c", running=2)
    await hold(index, a, long_prompt)
    await hold(index, b, long_prompt, 3)
    router = make_router(index=index, balance_slack=2, balance_ratio=0.5, index_lag_s=0)
    # a is 7 requests above the least loaded (> max(2, 0.5 * mean 4.3)): ranked last despite its cache;
    # among the others b's shorter prefix still counts.
    best, groups = await choose(router, [a, b, c], pending(long_prompt))
    assert best == "b" and groups[1][-1].replica_id.unique_id == "a"
    a.routing_stats = dict(running=4)  # within the bound again: its cache wins
    assert (await choose(router, [a, b, c], pending(long_prompt)))[0] == "a"


async def test_holder_a_few_requests_busier_keeps_its_conversation_at_low_load():
    """Benchmark run C's case: 8 in flight over 6 replicas, the holder of a long conversation runs 5 and
    two replicas are idle. Moving would re-prefill the history elsewhere; 5 is within slack of the mean
    (1.3), so the holder keeps it (a bound measured from the idle replicas passed it over)."""
    index = InMemoryPrefixIndex()
    history = list(range(2000, 2400))  # 100 blocks
    holder = FakeReplica("h", running=5, pending_prefill_tokens=40)
    others = [FakeReplica(x, running=r) for x, r in zip("abcde", [0, 1, 1, 1, 0])]
    await hold(index, holder, history)
    router = make_router(index=index)
    for k in range(10):
        assert (await choose(router, [*others, holder], pending(history + [k, k + 1, k + 2])))[0] == "h"
    holder.routing_stats = dict(running=12)  # a real hot spot: far above the mean
    assert (await choose(router, [*others, holder], pending(history + [9])))[0] != "h"


@pytest.mark.parametrize("index_lag_s", [2.0, 0.0])
async def test_burst_on_a_new_prefix_follows_its_first_holder_before_the_index_shows_it(index_lag_s):
    """Requests sharing a prefix nobody has published yet (the index answers: nobody holds it) follow the
    replica this router just sent it to, weighed against load as usual; once the lag window has passed,
    the index alone counts again. index_lag_s=0: the index alone, the burst scatters."""
    replicas = [FakeReplica(x, running=1) for x in "abcd"]
    router = make_router(index_lag_s=index_lag_s)  # an index that never hears from these replicas
    prefix = list(range(3000, 3040))  # 10 blocks
    first, _ = await choose(router, replicas, pending(prefix + [1]))
    wins = collections.Counter()
    for k in range(20):
        wins[(await choose(router, replicas, pending(prefix + [2, k])))[0]] += 1
    if not index_lag_s:
        assert len(wins) > 1 and router.chooser.outcomes == {"cache_miss": 21}
        return
    assert wins == {first: 20} and router.chooser.outcomes == {"cache_miss": 1, "cache_hit": 20}
    holder = next(r for r in replicas if r.replica_id.unique_id == first)
    holder.routing_stats = dict(running=2)  # one request more than the others: less than 10 blocks are worth
    assert (await choose(router, replicas, pending(prefix + [4])))[0] == first
    router.chooser.params = router.chooser.params.model_copy(update={"index_lag_s": 0.05})
    await asyncio.sleep(0.1)  # past the window: the index's "nobody" again, so load decides
    assert (await choose(router, replicas, pending(prefix + [5])))[0] != first


@pytest.mark.parametrize("others_cache", [True, False])
async def test_skew_spreads_a_burst_before_stats_refresh(others_cache):
    """All traffic shares one prefix, 60 requests arrive at once (no completions, stats stale at 0).
    With others_cache=False only `a` ever holds the prefix (the worst case for hot spots)."""
    index = InMemoryPrefixIndex()
    replicas = [FakeReplica(x) for x in "abc"]
    prompt = list(range(1000, 1400))  # 100 blocks: the prefix is worth more than any queue here
    await hold(index, replicas[0], prompt)
    router = make_router(index=index)
    load = collections.Counter()
    for _ in range(60):
        best, _ = await choose(router, replicas, pending(prompt), complete=False)
        load[best] += 1
        if others_cache:
            await hold(index, next(r for r in replicas if r.replica_id.unique_id == best), prompt)
    mean = 60 / 3
    assert max(load.values()) <= 1.5 * mean, load
    assert load["a"] == max(load.values())  # the holder still gets the most (its cache is worth something)


class DeadIndex:
    """An index whose every lookup answers None (Redis down or slow)."""
    lookup_failures = 0

    async def lookup(self, model_id, block_hashes, replica_ids):
        self.lookup_failures += 1
        return None

    async def warm(self):
        pass


async def test_index_unavailable_routes_by_load_and_counts_fallbacks():
    a, b = FakeReplica("a", running=6, pending_prefill_tokens=300), FakeReplica("b", running=1)
    router = make_router(index=DeadIndex())
    before = router_counters()["index_fallback"]
    for k in range(5):  # prompts this router has not routed before: load is all it knows
        assert (await choose(router, [a, b], pending([k, *PROMPT])))[0] == "b"
    assert router.chooser.outcomes == {"index_fallback": 5} and router_counters()["index_fallback"] - before == 5
    assert metric(router, "llmc_redis_fallbacks_total", component="router", reason="error") == 5
    assert metric(router, "llmc_router_index_lookup_seconds_count", model=MODEL) == 0  # only answers are timed


class FlakyIndex(InMemoryPrefixIndex):
    """The in-process index, with lookups that go unanswered (a late Redis) while `down`."""
    down = False

    async def lookup(self, model_id, block_hashes, replica_ids):
        if self.down:
            self.lookup_failures += 1
            return None
        return await super().lookup(model_id, block_hashes, replica_ids)


@pytest.mark.parametrize("recent_blocks", [32768, 0])
async def test_late_index_sends_the_prompt_where_this_router_sent_its_prefix(recent_blocks):
    """Turn 1 of a conversation goes anywhere (nobody holds it); while the index is late, the next turns
    (turn 1's prompt + more) follow turn 1 instead of a blind load-only choice, still weighed against load.
    recent_blocks=0 switches the record off: blind choices, spread over the fleet."""
    index = FlakyIndex()
    replicas = [FakeReplica(x, running=1) for x in "abcd"]
    router = make_router(index=index, recent_blocks=recent_blocks)
    turn1 = list(range(100, 140))  # 10 blocks
    first, _ = await choose(router, replicas, pending(turn1))
    index.down = True
    wins = collections.Counter()
    for k in range(40):
        wins[(await choose(router, replicas, pending(turn1 + list(range(k, k + 9)))))[0]] += 1
    if not recent_blocks:
        assert len(wins) > 1 and router.chooser.outcomes == {"cache_miss": 1, "index_fallback": 40}
        return
    assert wins == {first: 40}
    assert router.chooser.outcomes == {"cache_miss": 1, "local_fallback": 40}
    # The same cost model: a holder with far more queued work than the 10 blocks save is passed over.
    holder = next(r for r in replicas if r.replica_id.unique_id == first)
    holder.routing_stats = dict(running=1, pending_prefill_tokens=500)
    assert (await choose(router, replicas, pending(turn1 + [7])))[0] != first
    holder.routing_stats = dict(running=1)
    # Serve took a fallback group: the record follows where the request really went.
    pr = pending(list(range(200, 240)))
    best, groups = await choose(router, replicas, pr, complete=False)
    moved_to = groups[1][0].replica_id
    router.on_request_routed(pr, moved_to, None)
    router.on_request_completed(moved_to, pr.metadata.internal_request_id)
    assert (await choose(router, replicas, pending(list(range(200, 245)))))[0] == moved_to.unique_id


def test_recent_routes_are_bounded_and_keep_chain_heads():
    """At most max_blocks entries, in two generations of max_blocks / 2: the latest ones always answer, a
    prompt's blocks come and go together, and a long prompt keeps its leading blocks, so what is left of a
    chain still answers for the prompt's start. Later owners of a block win."""
    rec = RecentRoutes(max_blocks=20)
    chain_a = block_hashes(list(range(40)), BS)  # 10 blocks
    chain_b = block_hashes(list(range(1000, 1040)), BS)
    rec.record(chain_a, "a")
    assert rec.held(chain_a, ["a", "b"]) == {"a": 10}
    rec.record(chain_b, "b")
    assert len(rec) == 20 and rec.held(chain_a, ["a", "b"]) == {"a": 10} and rec.held(chain_b, ["a", "b"]) == {"b": 10}
    rec.record(chain_b[:3], "c")  # c took b's first 3 blocks since: b still has all 10; a is the oldest, dropped
    assert rec.held(chain_b, ["a", "b", "c"]) == {"c": 3, "b": 10} and rec.held(chain_a, ["a", "b"]) == {}
    assert rec.held(chain_b, ["a", "c"]) == {"c": 3}  # candidates only
    for k in range(200):
        chain = block_hashes(list(range(k, k + 400)), BS)  # 25 blocks: the first 10 are kept
        rec.record(chain, "x")
        assert len(rec) <= 20 and rec.held(chain, ["x"]) == {"x": 10}
    # Through the chooser: its record never exceeds recent_blocks.
    router = make_router(index=FlakyIndex(), recent_blocks=50)
    router.chooser._index.down = True  # noqa: SLF001 — drive the fallback path
    replicas = [FakeReplica(x) for x in "ab"]

    async def run():
        for k in range(30):
            await choose(router, replicas, pending(list(range(k * 100, k * 100 + 80))))
            assert len(router.chooser._recent) <= 50  # noqa: SLF001
    asyncio.run(run())


async def test_a_replica_that_left_is_forgotten_by_the_record():
    """A replica leaving the candidate set drops its entries: even if the same id were offered again,
    its old decisions are not used (its cache is gone with it)."""
    index = FlakyIndex()
    index.down = True
    a, b, c = FakeReplica("a"), FakeReplica("b", running=3), FakeReplica("c", running=3)
    router = make_router(index=index)
    ch = router.chooser
    ch.update({x.replica_id.unique_id: RoutingStats.from_serve(x.routing_stats) for x in (a, b, c)})
    prompt = list(range(300, 340))
    assert (await choose(router, [a, b, c], pending(prompt)))[0] == "a"  # by load
    assert (await choose(router, [a, b, c], pending(prompt + [1])))[0] == "a"
    assert ch.outcomes == {"index_fallback": 1, "local_fallback": 1} and len(ch._recent) == 10  # noqa: SLF001
    ch.update({x.replica_id.unique_id: RoutingStats.from_serve(x.routing_stats) for x in (b, c)})  # a is gone
    assert len(ch._recent) == 0  # noqa: SLF001
    ch.update({x.replica_id.unique_id: RoutingStats.from_serve(x.routing_stats) for x in (a, b, c)})
    a.routing_stats = dict(running=2)
    b.routing_stats = c.routing_stats = dict(running=2)
    await choose(router, [a, b, c], pending(prompt + [2]))
    assert ch.outcomes["index_fallback"] == 2 and ch.outcomes["local_fallback"] == 1


async def test_redis_paused_or_down_never_blocks_and_recovers(redis_server, redis_url):
    """A hung Redis costs at most the lookup timeout, then nothing (breaker). Meanwhile a prompt this router
    routed before follows its own decision (here: to the holder, not the less-loaded replica), a new one goes
    by load. Back up -> the index again."""
    index = RedisPrefixIndex(redis_url, timeout_s=0.02, breaker_s=0.3)
    a, b = FakeReplica("a", running=2), FakeReplica("b", running=1)
    await hold(index, a, PROMPT)
    router = make_router(index=index, index_lag_s=0)  # these fake replicas never publish what they are sent
    assert (await choose(router, [a, b], pending(PROMPT)))[0] == "a"
    redis_server.pause()
    try:
        for k in range(10):
            t0 = time.perf_counter()
            best, _ = await choose(router, [a, b], pending(PROMPT))
            # Sent PROMPT to a before; 0.5 s: 20 ms + a loaded box.
            assert time.perf_counter() - t0 < 0.5 and best == "a"
            t0 = time.perf_counter()
            best, _ = await choose(router, [a, b], pending([1000 + k, *PROMPT]))  # never routed: load only
            assert time.perf_counter() - t0 < 0.5 and best == "b"
        assert router.chooser.outcomes["local_fallback"] == 10 and router.chooser.outcomes["index_fallback"] == 10
        assert metric(router, "llmc_routing_decisions_total", policy="prefix", outcome="local_fallback") == 10
        assert metric(router, "llmc_redis_fallbacks_total", component="router", reason="timeout") >= 1
    finally:
        redis_server.resume()
    b.routing_stats = dict(running=0)
    await index.drop_replica(MODEL, "a")  # the index (the truth) says a lost it: no local guess once it answers
    async def best():
        return (await choose(router, [a, b], pending(PROMPT)))[0]
    t_end = time.monotonic() + 5  # for both waits
    await wait_until_async(best, 5, 0.05, "routing to follow the index again after Redis came back",
                           until=lambda r: r == "b")
    await hold(index, a, PROMPT)
    await wait_until_async(best, max(0.0, t_end - time.monotonic()), 0.05,
                           "prefix routing to come back after Redis did", until=lambda r: r == "a")
    await index.close()


async def test_index_warmed_by_the_first_routed_call(redis_server, redis_url):
    """The ingress's model_info call (routed before any request) warms the index: the first lookup is
    one EVALSHA, not EVALSHA (NOSCRIPT) + SCRIPT LOAD + EVALSHA on a fresh connection."""
    import redis
    index = RedisPrefixIndex(redis_url, timeout_s=1.0)
    a, b = FakeReplica("a", running=1), FakeReplica("b")
    await hold(index, a, PROMPT)
    admin = redis.Redis.from_url(redis_url)
    admin.script_flush()
    router = make_router(index=index)
    info = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
        request_id="i", internal_request_id="i", call_method="model_info"))
    await router.choose_replicas([a, b], info)
    await asyncio.wait_for(router.chooser._warming, 5)
    admin.config_resetstat()
    assert (await choose(router, [a, b], pending(PROMPT)))[0] == "a"
    stats = admin.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and not stats["cmdstat_evalsha"].get("failed_calls")
    assert not [k for k in stats if k.startswith("cmdstat_script")]
    admin.close()
    await index.close()


async def test_round_robin_cycles():
    replicas = [FakeReplica(x, running=i) for i, x in enumerate("abc")]
    router = make_router(policy="round_robin")
    seq = [(await choose(router, replicas, pending(PROMPT)))[0] for _ in range(9)]
    assert all(seq[i] != seq[i + 1] for i in range(8)) and collections.Counter(seq) == {"a": 3, "b": 3, "c": 3}


async def test_pow2_never_picks_the_busiest_and_ignores_cache():
    index = InMemoryPrefixIndex()
    busy = FakeReplica("busy", running=10, pending_prefill_tokens=100)
    replicas = [busy, FakeReplica("x", running=1), FakeReplica("y", running=1)]
    await hold(index, busy, PROMPT)
    router = make_router(policy="pow2", index=index)
    wins = collections.Counter([(await choose(router, replicas, pending(PROMPT)))[0] for _ in range(100)])
    assert wins["busy"] == 0 and wins["x"] > 20 and wins["y"] > 20
    assert router.chooser.outcomes == {"no_lookup": 100}


async def test_own_assignments_follow_serve_and_are_released():
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router()
    pr = pending(PROMPT)
    best, groups = await choose(router, [a, b], pr, complete=False)
    other = groups[1][0]
    c = router.chooser
    assert c.inflight(best) == 1
    router.on_request_routed(pr, other.replica_id, None)  # Serve used the fallback group
    assert c.inflight(best) == 0 and c.inflight(other.replica_id.unique_id) == 1
    router.on_request_completed(other.replica_id, pr.metadata.internal_request_id)
    assert c.inflight(other.replica_id.unique_id) == 0
    pr2 = pending(PROMPT)  # a caller that gives up before Serve sends its request
    best2, _ = await choose(router, [a, b], pr2, complete=False)
    pr2.future.cancel()
    await asyncio.sleep(0)
    assert c.inflight(best2) == 0 and not c.is_assigned(pr2.metadata.internal_request_id)


async def test_hashes_computed_when_the_ingress_sent_none():
    index = InMemoryPrefixIndex()
    a, b = FakeReplica("a", running=1), FakeReplica("b")
    await hold(index, a, PROMPT)
    router = make_router(index=index)
    assert (await choose(router, [a, b], pending(PROMPT, with_hashes=False)))[0] == "a"


async def test_non_generation_calls_route_by_load():
    a, b = FakeReplica("a", running=5), FakeReplica("b")
    router = make_router()
    pr = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
        request_id="x", internal_request_id="x", call_method="model_info"))
    groups = await router.choose_replicas([a, b], pr)
    assert groups[0][0].replica_id.unique_id == "b" and not router.chooser.is_assigned("x")


def test_router_config_from_cluster_config():
    cfg = load_config(overrides={"router.policy": "pow2", "redis_url": "redis://127.0.0.1:1",
                                 "engine.block_size": 32, "router.redis_timeout_ms": 7, "router.prefix_weight": 1.5,
                                 "router.balance_slack": 6, "router.balance_ratio": 0.25})
    rc = request_router_config(cfg)
    assert rc.request_router_class == "router.routing.KVAwareRouter"
    p = RoutingParams.model_validate(rc.request_router_kwargs)
    assert (p.policy, p.model_id, p.block_size, p.redis_url, p.redis_timeout_ms) == \
        ("pow2", EMBEDDED_MODEL, 32, "redis://127.0.0.1:1", 7)
    assert (p.prefix_weight, p.balance_slack, p.balance_ratio) == (1.5, 6, 0.25)
    assert rc.request_routing_stats_period_s <= 1


async def test_shipped_router_class_works_and_shares_process_state():
    """Serve pickles router.routing by value into every handle's process: the copy must build, route,
    and count into the same process-wide counters as the original (they live in replica_choice)."""
    rc = request_router_config(load_config(overrides={"engine.block_size": BS}))
    cls = rc.get_request_router_class()
    router = cls(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**rc.request_router_kwargs)  # no redis_url: every decision is load-only
    before = router_counters()["index_fallback"]
    a, b = FakeReplica("a", running=3), FakeReplica("b")
    assert (await choose(router, [a, b], pending(PROMPT)))[0] == "b"
    assert router_counters()["index_fallback"] == before + 1


def test_served_model_id():
    assert load_config().engine.served_model_id == EMBEDDED_MODEL
    assert load_config(overrides={"engine.model": "/x/tiny-llama/"}).engine.served_model_id == "tiny-llama"
    assert load_config(overrides={"engine.model": "/x/y", "engine.model_id": "z"}).engine.served_model_id == "z"


async def test_own_prefill_counts_until_the_replica_stats_refresh():
    stats = {"waiting": 0, "running": 1}
    replicas = {x: FakeReplica(x, **stats) for x in "ab"}
    router = make_router(index_lag_s=0)  # one prompt again and again: only the load accounting tells them apart
    c = router.chooser
    c.update({x: RoutingStats.from_serve(r.routing_stats) for x, r in replicas.items()})
    first, _ = await choose(router, list(replicas.values()), pending(PROMPT), complete=False)
    other = "b" if first == "a" else "a"
    # Both report one running request; only the prefill just sent to `first` tells them apart.
    for _ in range(10):
        assert (await choose(router, list(replicas.values()), pending(PROMPT)))[0] == other
    replicas[first].routing_stats = {"waiting": 0, "running": 1, "pending_prefill_tokens": 0, "kv_usage": 0.1}
    # Its stats now include that request.
    c.update({x: RoutingStats.from_serve(r.routing_stats) for x, r in replicas.items()})
    wins = collections.Counter([(await choose(router, list(replicas.values()), pending(PROMPT)))[0]
                                for _ in range(100)])
    assert wins[first] > 20, wins
    c.update({other: RoutingStats.from_serve(replicas[other].routing_stats)})  # `first` is gone
    assert c.inflight(first) == 0


async def test_several_ingress_routers_spread_a_burst_without_a_hot_spot():
    """Four ingress replicas, each with its own router, share the replicas and the index; a burst on one
    prefix held by `a` comes in through all of them before any stats refresh. Each router sees only its
    own decisions, so without estimating the others' they would each pile their share onto `a`."""
    routers = 4
    index = InMemoryPrefixIndex()
    replicas = [FakeReplica(x) for x in "abc"]
    prompt = list(range(1000, 1400))
    await hold(index, replicas[0], prompt)
    ingress = [make_router(index=index, routers=routers) for _ in range(routers)]
    load = collections.Counter()
    for i in range(60):
        best, _ = await choose(ingress[i % routers], replicas, pending(prompt), complete=False)
        load[best] += 1
    assert max(load.values()) <= 1.5 * 60 / 3, load
    assert load["a"] == max(load.values())  # the holder still gets the most
