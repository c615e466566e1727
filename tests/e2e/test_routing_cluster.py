"""KV-aware routing on a real local Ray Serve cluster: 3 tiny-model replicas publishing their KV blocks
to a real Redis, the `prefix` policy in the ingress's router (HTTP) and in a driver handle's router.

- requests sharing a prefix land on the replica holding it (the API's usage.cached_tokens);
- all traffic on one prefix still spreads (per-replica in-flight sampled from the replicas themselves);
- Redis killed mid-run: no request fails, the router counts fallbacks and routes a prefix it sent before
  by its own recent decisions (still cache hits), and prefix hits come back once Redis does (publishers
  resync).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest

from replicas.engine.hashing import block_hashes, extra_key
from replicas.engine.protocol import GenerationRequest, SamplingParams
from router.replica_choice import router_counters
from tests.fixtures.configs import serve_config
from tests.fixtures.redis import ensure_running
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP = "routing-test"
BS = 16
N_REPLICAS = 3


@pytest.fixture(scope="module")
def cluster(serve_app, redis_server, tiny_model_dir):
    ensure_running(redis_server)
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.block_size": BS, "engine.num_kv_blocks": 512, "replicas.num_replicas": N_REPLICAS,
        "redis_url": redis_server.url, "router.policy": "prefix",
        # A 2-core box shared by 3 replicas, the proxy, the ingress and the test: give the index lookup
        # more than the 5 ms default so that event-loop lag does not turn lookups into fallbacks.
        "router.redis_timeout_ms": 100}), name=APP, replicas=N_REPLICAS)
    return app


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 460) for _ in range(n)]  # the tiny tokenizer has 472 ids


async def complete(http: httpx.AsyncClient, prompt: list[int], max_tokens: int = 4) -> dict:
    r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                 "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


async def test_requests_sharing_a_prefix_land_on_its_holder(cluster):
    base = cluster.base
    rng = random.Random(1)
    sessions = [tokens(rng, 6 * BS) for _ in range(6)]  # each its own 96-token prefix
    hits, total = 0, 0

    async def session(http, prefix):
        nonlocal hits, total
        for turn in range(4):
            usage = (await complete(http, prefix + tokens(rng, 8)))["usage"]
            if turn:
                total += 1
                hits += usage["prompt_tokens_details"]["cached_tokens"] >= len(prefix)
            await asyncio.sleep(0.3)  # the holder's block events reach Redis (flushed every 50 ms)

    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await asyncio.gather(*(session(http, p) for p in sessions))
    # Placed at random, 1 in 3 would hit.
    assert hits >= total - 1, f"{hits}/{total} follow-up turns found their prefix cached"


def test_all_traffic_on_one_prefix_still_spreads(cluster):
    cfg, handle = cluster.cfg, cluster.handle
    rng = random.Random(2)
    prefix = tokens(rng, 8 * BS)
    model = cfg.engine.served_model_id
    before = cluster.replica_stats()
    samples: list[dict[str, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append({rid: s["num_waiting"] + s["num_running"] for rid, s in cluster.replica_stats().items()})
            time.sleep(0.05)

    async def one(i: int) -> None:
        prompt = prefix + tokens(rng, 8)
        req = GenerationRequest(request_id=f"skew-{i}", prompt_token_ids=prompt,
                                sampling=SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
                                block_hashes=block_hashes(prompt, BS, extra_key(model)))
        chunks = [c async for c in handle.options(stream=True).generate.remote(req)]
        assert chunks[-1].usage.completion_tokens == 48

    async def burst():
        await asyncio.gather(*(one(i) for i in range(36)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        asyncio.run(burst())
    finally:
        stop.set()
        sampler.join(10)
    after = cluster.replica_stats()
    # Requests each replica admitted: its prefix-cache query tokens grew by one prompt per request.
    served = {rid: round((after[rid]["prefix_query_tokens"] - before[rid]["prefix_query_tokens"]) / (len(prefix) + 8))
              for rid in after}
    assert sum(served.values()) >= 36 and max(served.values()) <= 1.5 * sum(served.values()) / N_REPLICAS, served
    busy = [s for s in samples if sum(s.values()) > 0]
    assert len(busy) >= 3, "the burst ended before the replicas were sampled"
    mean_inflight = {rid: sum(s.get(rid, 0) for s in busy) / len(busy) for rid in after}
    overall = sum(mean_inflight.values()) / N_REPLICAS
    assert max(mean_inflight.values()) <= 1.5 * overall, mean_inflight


def test_redis_killed_mid_run_no_failures_fallback_then_recovery(cluster, redis_server):
    base, cfg, handle = cluster.base, cluster.cfg, cluster.handle
    rng = random.Random(3)
    model = cfg.engine.served_model_id
    prefix = tokens(rng, 6 * BS)

    def via_handle(i: int) -> int:
        prompt = prefix + tokens(rng, 4)
        req = GenerationRequest(request_id=f"redis-{i}-{time.monotonic_ns()}", prompt_token_ids=prompt,
                                sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                block_hashes=block_hashes(prompt, BS, extra_key(model)))
        chunks = list(handle.options(stream=True).generate.remote(req))
        return chunks[-1].usage.cached_prompt_tokens

    failures: list[str] = []
    done = threading.Event()

    async def http_load():
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def client(k):
                p = tokens(random.Random(k), 4 * BS)
                while not done.is_set():
                    try:
                        r = await http.post("/v1/completions", json={"prompt": p + tokens(rng, 4), "max_tokens": 4,
                                                                     "temperature": 0, "ignore_eos": True})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
            await asyncio.gather(*(client(k) for k in range(3)))

    loader = threading.Thread(target=lambda: asyncio.run(http_load()), daemon=True)
    loader.start()
    try:
        via_handle(0)
        # Routed to a holder while Redis is up, once the holder's publisher has flushed (a batch interval,
        # longer on a saturated box: poll, bounded).
        wait_until(lambda: via_handle(1) >= len(prefix), 15, 0.3, "the prefix routed to its holder while Redis is up")
        redis_server.stop(graceful=False)  # a crash: connections refused from here on
        before = router_counters()
        # Served all the same; this handle's router sent the prefix to its holder before, so it still does
        # (by its own recent decisions, not blind: the holder's cache keeps answering).
        cached = [via_handle(10 + i) for i in range(5)]
        after = router_counters()
        assert after["local_fallback"] + after["index_fallback"] >= \
            before["local_fallback"] + before["index_fallback"] + 5
        assert after["local_fallback"] >= before["local_fallback"] + 3
        assert sum(c >= len(prefix) for c in cached) >= 3, cached
        time.sleep(1.0)
        redis_server.restart()  # empty, same port: publishers resync, routers reconnect
        hits = router_counters()["cache_hit"]
        wait_until(lambda: via_handle(100) >= len(prefix) and router_counters()["cache_hit"] > hits, 20, 0.3,
                   "prefix routing to recover after Redis came back")
    finally:
        done.set()
        loader.join(60)
        ensure_running(redis_server)
    assert not failures, failures[:5]
