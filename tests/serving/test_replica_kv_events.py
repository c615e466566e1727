"""LLMReplica -> prefix index wiring outside Serve: the engine's block events reach Redis under the
replica's id and epoch, shutdown removes them, and a missing or dead Redis never affects serving."""
from __future__ import annotations

import asyncio
import time

from cluster.ports import free_port
from kvstore.index import RedisPrefixIndex
from replicas.deployment import LLMReplica
from replicas.engine.hashing import block_hashes, extra_key
from replicas.engine.protocol import GenerationRequest, SamplingParams
from tests.fixtures.configs import cluster_config
from tests.fixtures.wait import wait_until_async

PROMPT = list(range(10, 23))  # 3 full blocks of 4


def make_replica(model_dir, redis_url) -> LLMReplica:
    return LLMReplica(cluster_config(model_dir, {"engine.block_size": 4, "engine.num_kv_blocks": 64,
                                                 "redis_url": redis_url}).replica_config())


async def generate(replica: LLMReplica, rid: str):
    req = GenerationRequest(request_id=rid, prompt_token_ids=PROMPT,
                            sampling=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    return [c async for c in replica.generate(req)]


async def held(index, replica) -> int:
    model = replica.engine_config.served_model_id
    hashes = block_hashes(PROMPT, 4, extra_key(model))
    return (await index.lookup(model, hashes, [replica.replica_id]))[replica.replica_id]


async def test_replica_publishes_blocks_and_drops_them_on_shutdown(tiny_model_dir, redis_url):
    replica = make_replica(tiny_model_dir, redis_url)
    index = RedisPrefixIndex(redis_url, timeout_s=1.0)
    try:
        # Its start-up snapshot (of an empty cache) is done: from here on only block events can add entries.
        await wait_until_async(lambda: replica.publisher.resyncs > 0, 10, 0.02, "the publisher's start-up snapshot")
        chunks = await generate(replica, "a")
        assert chunks[-1].usage.completion_tokens == 3
        await wait_until_async(lambda: held(index, replica), 10, 0.05, "the replica's blocks in the index",
                               until=lambda n: n == 3)
        replica.__del__()  # what Serve calls on shutdown
        await asyncio.wait_for(replica._publisher_task, 5)
        assert await held(index, replica) == 0
    finally:
        replica.engine.shutdown(timeout=1)
        await index.close()


async def test_dead_or_bad_redis_never_affects_serving(tiny_model_dir):
    dead = make_replica(tiny_model_dir, f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    bad = make_replica(tiny_model_dir, "not-a-url://x")
    try:
        assert bad.publisher is None
        for replica in (dead, bad):
            t0 = time.perf_counter()
            chunks = await asyncio.wait_for(generate(replica, "a"), 30)
            assert chunks[-1].usage.completion_tokens == 3 and time.perf_counter() - t0 < 10
        await asyncio.sleep(0.2)
        assert dead.publisher.errors >= 1  # it tried, failed, and the engine never noticed
        dead.__del__()
        await asyncio.wait_for(dead._publisher_task, 5)  # stop never raises, even with Redis gone
    finally:
        for replica in (dead, bad):
            replica.engine.shutdown(timeout=1)
