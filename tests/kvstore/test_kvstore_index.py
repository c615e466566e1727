"""kvstore.index: leading-prefix lookups, epochs, heartbeat expiry and cleanup, on a real Redis
(and the in-process backend the router's unit tests use, which must behave the same)."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from kvstore.index import InMemoryPrefixIndex, RedisPrefixIndex

M = "tiny-llama"
H = list(range(1000, 1064))  # a 64-block prompt's hashes (values need not be real hashes here)


@pytest.fixture(params=["redis", "memory"])
async def index(request):
    if request.param == "memory":
        yield InMemoryPrefixIndex()
        return
    idx = RedisPrefixIndex(request.getfixturevalue("redis_url"), timeout_s=1.0)
    yield idx
    await idx.close()


async def live(index, replica, epoch="e1", hashes=(), ttl_s=30.0):
    await index.heartbeat(M, replica, epoch, ttl_s)
    await index.replace(M, replica, epoch, hashes)


async def test_leading_prefix_per_replica(index):
    await live(index, "a", hashes=H[:10])
    await live(index, "b", hashes=H[:40])
    await live(index, "c", hashes=H[:5] + H[6:64])  # gap at block 5: only 5 leading blocks count
    await live(index, "d", hashes=H[1:64])  # everything but the first block: nothing leading
    got = await index.lookup(M, H, ["a", "b", "c", "d", "unknown"])
    assert got == {"a": 10, "b": 40, "c": 5, "d": 0, "unknown": 0}
    assert await index.lookup(M, H[:3], ["b"]) == {"b": 3}
    assert await index.lookup(M, [], ["a"]) == {"a": 0}
    assert await index.lookup(M, H, []) == {}
    assert await index.lookup("other-model", H, ["a"]) == {"a": 0}


async def test_long_prompt_crosses_lua_chunks(index):
    long = list(range(5000, 5300))
    await live(index, "a", hashes=long[:299])
    await live(index, "b", hashes=long[:32])  # exactly one chunk
    await live(index, "c", hashes=long[:33])
    assert await index.lookup(M, long, ["a", "b", "c"]) == {"a": 299, "b": 32, "c": 33}


async def test_add_remove_update_replace(index):
    await live(index, "a")
    await index.add(M, "a", "e1", H[:8])
    assert await index.lookup(M, H, ["a"]) == {"a": 8}
    await index.remove(M, "a", "e1", [H[3]])
    assert await index.lookup(M, H, ["a"]) == {"a": 3}
    await index.update(M, "a", "e1", added=[H[3], H[8]], removed=[H[0]])
    assert await index.lookup(M, H, ["a"]) == {"a": 0}
    await index.update(M, "a", "e1", added=[H[0]], removed=[])
    assert await index.lookup(M, H, ["a"]) == {"a": 9}
    await index.replace(M, "a", "e1", H[:2])
    assert await index.lookup(M, H, ["a"]) == {"a": 2}


async def test_expired_heartbeat_is_ignored_then_swept(index):
    await live(index, "dead", hashes=H[:20], ttl_s=0.3)
    await live(index, "alive", hashes=H[:7], ttl_s=30)
    assert await index.lookup(M, H, ["dead", "alive"]) == {"dead": 20, "alive": 7}
    await asyncio.sleep(0.45)
    assert await index.lookup(M, H, ["dead", "alive"]) == {"dead": 0, "alive": 7}
    assert await index.sweep(M) == 1
    assert await index.sweep(M) == 0
    # A late heartbeat from the same epoch reports its entries as gone, so the replica resyncs.
    assert await index.heartbeat(M, "dead", "e1", 30) is False
    assert await index.lookup(M, H, ["dead"]) == {"dead": 0}


async def test_heartbeat_reports_whether_entries_are_intact(index):
    assert await index.heartbeat(M, "a", "e1", 30) is False  # first beat: nothing published yet
    assert await index.heartbeat(M, "a", "e1", 30) is True


async def test_new_epoch_hides_the_old_one_at_once(index):
    await live(index, "a", epoch="e1", hashes=H[:30])
    assert await index.lookup(M, H, ["a"]) == {"a": 30}
    await index.heartbeat(M, "a", "e2", 30)  # the replica's engine restarted
    assert await index.lookup(M, H, ["a"]) == {"a": 0}
    await index.add(M, "a", "e1", H[30:40])  # a straggling write from the old engine stays invisible
    await index.add(M, "a", "e2", H[:4])
    assert await index.lookup(M, H, ["a"]) == {"a": 4}


async def test_drop_replica_only_drops_the_named_epoch(index):
    await live(index, "a", epoch="e1", hashes=H[:30])
    await live(index, "a", epoch="e2", hashes=H[:12])
    await index.drop_replica(M, "a", "e1")  # the old engine's late clean shutdown
    assert await index.lookup(M, H, ["a"]) == {"a": 12}
    await index.drop_replica(M, "a", "e2")
    assert await index.lookup(M, H, ["a"]) == {"a": 0}
    await live(index, "b", hashes=H[:3])
    await index.drop_replica(M, "b")
    assert await index.lookup(M, H, ["b"]) == {"b": 0}


async def test_redis_keys_are_deleted_not_just_hidden(redis_url):
    idx = RedisPrefixIndex(redis_url, timeout_s=1.0)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await live(idx, "a", epoch="e1", hashes=H[:30])
        await live(idx, "b", epoch="e1", hashes=H[:30], ttl_s=0.2)
        await idx.heartbeat(M, "a", "e2", 30)
        assert not await r.exists(f"llmc:{{{M}}}:r:a:e1")  # old epoch's set gone with the new epoch
        await asyncio.sleep(0.3)
        await idx.sweep(M)
        assert not await r.exists(f"llmc:{{{M}}}:r:b:e1")
        assert await r.hkeys(f"llmc:{{{M}}}:reg") == [b"a"]
        await idx.drop_replica(M, "a")
        assert await r.keys("llmc:*") == []
        # Sets carry a TTL, so even a model nobody sweeps any more frees its memory.
        idx2 = RedisPrefixIndex(redis_url, timeout_s=1.0, entry_ttl_s=60)
        await live(idx2, "c", hashes=H[:3])
        assert 0 < await r.pttl(f"llmc:{{{M}}}:r:c:e1") <= 60_000
        await idx2.close()
    finally:
        await idx.close()
        await r.aclose()
