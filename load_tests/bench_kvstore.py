"""Micro-benchmark of the prefix index lookup the router makes on every request.

A 64-block prompt against 4 live replicas that hold it to different depths (64, 32, 8, 0 leading
blocks), each with a realistic set size around it. Reports client-side latency (p50/p99/p99.9,
sequential and with concurrent callers), Redis' own time per lookup script, and how many lookups the
production timeout would have turned into "route by load".

    python -m load_tests.bench_kvstore [--n 5000] [--redis-url redis://...]   (default: embedded Redis)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time

import redis.asyncio as aioredis

from kvstore.index import RedisPrefixIndex
from replicas.engine.hashing import block_hashes, extra_key

MODEL = "bench-model"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _setup(url: str, blocks: int, set_size: int, replicas: int) -> tuple[list[int], list[str]]:
    rng = random.Random(0)
    prompt = block_hashes([rng.randrange(50_000) for _ in range(blocks * 16)], 16, extra_key(MODEL))
    ids = [f"replica-{i}" for i in range(replicas)]
    depths = [blocks, blocks // 2, blocks // 8, 0] + [0] * max(0, replicas - 4)
    idx = RedisPrefixIndex(url, timeout_s=30, write_timeout_s=30)
    for rid, depth in zip(ids, depths):
        others = [rng.getrandbits(63) for _ in range(set_size - depth)]
        await idx.heartbeat(MODEL, rid, "e1", 3600)
        await idx.replace(MODEL, rid, "e1", prompt[:depth] + others)
    want = dict(zip(ids, depths))
    got = await idx.lookup(MODEL, prompt, ids)  # also loads the script
    await idx.close()
    assert got == want, (got, want)
    return prompt, ids


async def _sequential(url: str, prompt, ids, n: int, timeout_s: float) -> tuple[list[float], int]:
    # Measured with a generous timeout so every sample is real; `timeout_s` only counts the would-be misses.
    idx = RedisPrefixIndex(url, timeout_s=1.0)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await idx.lookup(MODEL, prompt, ids)
        lat.append(time.perf_counter() - t0)
    await idx.close()
    return lat, sum(x > timeout_s for x in lat)


async def _concurrent(url: str, prompt, ids, n: int, callers: int) -> tuple[list[float], float]:
    idx = RedisPrefixIndex(url, timeout_s=1.0)
    lat: list[float] = []

    async def caller():
        for _ in range(n // callers):
            t0 = time.perf_counter()
            await idx.lookup(MODEL, prompt, ids)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall = time.perf_counter() - t0
    await idx.close()
    return lat, len(lat) / wall


async def _server_usec_per_call(url: str) -> float | None:
    r = aioredis.Redis.from_url(url)
    stats = await r.info("commandstats")
    await r.aclose()
    return stats.get("cmdstat_evalsha", {}).get("usec_per_call")


async def run(url: str, n: int, blocks: int, set_size: int, replicas: int, timeout_ms: float,
              callers: int) -> dict:
    prompt, ids = await _setup(url, blocks, set_size, replicas)
    await _sequential(url, prompt, ids, 200, 1.0)  # warm up
    r = aioredis.Redis.from_url(url)
    await r.config_resetstat()
    await r.aclose()
    seq, misses = await _sequential(url, prompt, ids, n, timeout_ms / 1000)
    server_us = await _server_usec_per_call(url)
    conc, rate = await _concurrent(url, prompt, ids, n, callers)
    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    return {
        "blocks": blocks, "replicas": replicas, "set_size_per_replica": set_size, "n": n,
        "sequential_ms": {"p50": ms(_pct(seq, .5)), "p99": ms(_pct(seq, .99)), "p999": ms(_pct(seq, .999)),
                          "mean": ms(statistics.fmean(seq))},
        "redis_server_us_per_lookup": server_us,
        f"over_{timeout_ms:g}ms_timeout": f"{misses}/{n}",
        f"concurrent_{callers}_ms": {"p50": ms(_pct(conc, .5)), "p99": ms(_pct(conc, .99))},
        "concurrent_lookups_per_s": round(rate),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="default: start an embedded Redis")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--set-size", type=int, default=20_000, help="blocks each replica holds")
    ap.add_argument("--timeout-ms", type=float, default=5.0, help="the router's lookup timeout")
    ap.add_argument("--callers", type=int, default=16)
    args = ap.parse_args(argv)
    kw = dict(n=args.n, blocks=args.blocks, set_size=args.set_size, replicas=args.replicas,
              timeout_ms=args.timeout_ms, callers=args.callers)
    if args.redis_url:
        out = asyncio.run(run(args.redis_url, **kw))
    else:
        from cluster.redis_server import EmbeddedRedis
        with EmbeddedRedis() as server:
            out = asyncio.run(run(server.url, **kw))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
