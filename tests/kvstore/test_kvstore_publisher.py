"""kvstore.publisher: engine block events reach the index; overflow, dead replicas and a dead or hung
Redis are survived and repaired by resync. Against a real Redis server."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvstore.index import InMemoryPrefixIndex, RedisPrefixIndex
from kvstore.publisher import KVEventPublisher
from tests.fixtures.wait import wait_until_async

M = "tiny-llama"
H = list(range(2000, 2064))


class FakeEngineCache:
    """What the engine exposes: its cached hashes, mutated from its own thread, events to the hooks."""

    def __init__(self, publisher=None):
        self.blocks: set[int] = set()
        self.lock = threading.Lock()
        self.publisher = publisher

    def store(self, hashes):
        with self.lock:
            self.blocks.update(hashes)
        self.publisher.on_blocks_stored(list(hashes))

    def evict(self, hashes):
        with self.lock:
            self.blocks.difference_update(hashes)
        self.publisher.on_blocks_evicted(list(hashes))

    def snapshot(self):
        with self.lock:
            return list(self.blocks)


async def eventually(fn, want, timeout_s=3.0):
    """Poll fn() (sync or async) until it returns `want`; returns the last value seen (the caller asserts)."""
    return await wait_until_async(fn, timeout_s, 0.02, until=lambda got: got == want, check=False)


def make(index, replica="a", epoch="e1", **kw):
    cache = FakeEngineCache()
    kw.setdefault("flush_interval_s", 0.02)
    pub = KVEventPublisher(index, M, replica, epoch, full_set=cache.snapshot, **kw)
    cache.publisher = pub
    return pub, cache


@pytest.fixture
async def index(redis_url):
    idx = RedisPrefixIndex(redis_url, timeout_s=1.0)
    yield idx
    await idx.close()


async def held(index, replica="a", hashes=H):
    return (await index.lookup(M, hashes, [replica]))[replica]


async def test_stored_and_evicted_events_are_reflected(index):
    pub, cache = make(index)
    await pub.start()
    try:
        assert await eventually(lambda: pub.resyncs, 1) == 1
        # Events come from the engine's thread.
        t = threading.Thread(target=lambda: (cache.store(H[:10]), cache.store(H[10:20])))
        t.start()
        t.join()
        assert await eventually(lambda: held(index), 20) == 20
        await asyncio.to_thread(cache.evict, [H[15]])
        assert await eventually(lambda: held(index), 15) == 15
        # Net effect inside one batch: stored then evicted is absent, evicted then stored is present.
        cache.store([H[15]])
        cache.evict([H[15]])
        cache.evict([H[0]])
        cache.store([H[0]])
        await asyncio.sleep(0.15)
        assert await held(index) == 15
        assert pub.resyncs == 1 and pub.errors == 0 and pub.flushed_batches >= 2
    finally:
        await pub.stop()
    assert await held(index) == 0  # a clean stop drops the replica's entries


async def test_start_publishes_what_the_engine_already_caches(index):
    pub, cache = make(index)
    cache.blocks.update(H[:12])  # cached before the publisher started
    await pub.start()
    try:
        assert await eventually(lambda: held(index), 12) == 12
    finally:
        await pub.stop()


async def test_overflow_triggers_a_resync(index):
    pub, cache = make(index, max_buffer=8, flush_interval_s=0.5)
    await pub.start()
    try:
        assert await eventually(lambda: pub.resyncs, 1) == 1
        cache.store(H[:5])
        cache.store(H[5:12])  # 12 buffered hashes > 8: events dropped, resync instead
        assert pub.overflows == 1
        assert await eventually(lambda: held(index), 12) == 12
        assert await eventually(lambda: pub.resyncs, 2) == 2  # counted once its task resumes
    finally:
        await pub.stop()


async def test_hooks_are_cheap_and_never_raise(index):
    pub, cache = make(index, max_buffer=10_000)
    pub._diverged = False
    t0 = time.perf_counter()
    for i in range(10_000):
        pub.on_blocks_stored([i])
    per_call_us = (time.perf_counter() - t0) / 10_000 * 1e6
    assert per_call_us < 200  # in-memory append only (loose bound: shared 2-core box)
    pub.on_blocks_stored(None)  # garbage from the engine: swallowed, repaired by a resync
    assert pub._diverged


async def test_killed_replica_is_ignored_within_its_ttl_and_swept(index):
    dead, dead_cache = make(index, replica="dead", heartbeat_ttl_s=0.4)
    alive, _ = make(index, replica="alive", heartbeat_ttl_s=0.4, sweep_interval_s=0.1)
    await dead.start()
    await alive.start()
    try:
        dead_cache.store(H[:20])
        assert await eventually(lambda: held(index, "dead"), 20) == 20
        dead._task.cancel()  # killed: no clean stop, no more heartbeats
        t0 = time.monotonic()
        assert await eventually(lambda: held(index, "dead"), 0, timeout_s=5) == 0
        assert time.monotonic() - t0 < 2.0
        # The surviving replica's periodic sweep deletes the dead one's entries.
        r = index._redis
        assert await eventually(lambda: r.exists(f"llmc:{{{M}}}:r:dead:e1"), 0) == 0
    finally:
        await alive.stop()


async def test_new_epoch_hides_the_old_one(index):
    old, old_cache = make(index, epoch="e1")
    await old.start()
    old_cache.store(H[:20])
    assert await eventually(lambda: held(index), 20) == 20
    old._task.cancel()  # the engine died; the replica starts a new one with a new epoch
    new, new_cache = make(index, epoch="e2")
    await new.start()
    try:
        assert await eventually(lambda: held(index), 0) == 0
        new_cache.store(H[:3])
        assert await eventually(lambda: held(index), 3) == 3
        await old.stop()  # the old engine's late shutdown must not drop the new epoch
        assert await held(index) == 3
    finally:
        await new.stop()


@pytest.mark.parametrize("failure", ["killed", "hung"])
async def test_redis_down_lookup_degrades_then_everything_recovers(redis_server, redis_url, failure):
    budget_s = 0.05
    router = RedisPrefixIndex(redis_url, timeout_s=budget_s, breaker_s=0.3)
    writer = RedisPrefixIndex(redis_url, write_timeout_s=0.3)
    pub, cache = make(writer, heartbeat_ttl_s=0.6, retry_s=0.1)
    await pub.start()
    try:
        cache.store(H[:16])
        assert await eventually(lambda: held(router), 16) == 16

        if failure == "killed":
            redis_server.stop(graceful=False)
        else:
            redis_server.pause()  # accepts connections, never answers: only the timeout saves us
        t0 = time.perf_counter()
        assert await router.lookup(M, H, ["a", "b"]) is None
        first = time.perf_counter() - t0
        assert first < budget_s + 0.25, first  # within the budget (plus scheduling slack)
        took = []
        for _ in range(20):  # the breaker answers at once while it is open
            t0 = time.perf_counter()
            assert await router.lookup(M, H, ["a"]) is None
            took.append(time.perf_counter() - t0)
        assert sorted(took)[10] < 0.005  # the median: a stalled box may delay one or two of them
        assert router.lookup_failures == 21

        # The engine keeps caching while Redis is away; hooks must not raise or block.
        cache.store(H[16:40])
        cache.evict(H[:2])
        cache.store(H[:2])
        await asyncio.sleep(0.5)
        assert pub.errors >= 1

        redis_server.restart()  # back on the same port, empty: the index must be rebuilt by resync
        assert await eventually(lambda: held(router), 40, timeout_s=5) == 40
        # Redis has the replaced set before the publisher's task resumes to count the resync.
        assert await eventually(lambda: pub.resyncs >= 2, True) is True
    finally:
        redis_server.resume()
        await pub.stop()
        await router.close()
        await writer.close()


async def test_in_memory_index_serves_publishers_too():
    idx = InMemoryPrefixIndex()
    pub, cache = make(idx)
    await pub.start()
    try:
        cache.store(H[:9])
        assert await eventually(lambda: held(idx), 9) == 9
    finally:
        await pub.stop()
    assert await held(idx) == 0
