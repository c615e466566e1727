"""LLMReplica.generate paces its streams by the replica's chunk budget: fewer, larger chunks under load,
carrying exactly the engine's tokens and text; the first chunk is never held back; a consumer that leaves
frees the request's blocks at once."""
from __future__ import annotations

import asyncio

import pytest

from replicas.engine.protocol import GenerationRequest, SamplingParams
from tests.fixtures.configs import cluster_config


@pytest.fixture
def make_replica(tiny_model_dir):
    from replicas.deployment import LLMReplica

    made = []

    def make(chunks_per_s: float):
        cfg = cluster_config(tiny_model_dir, {"engine.num_kv_blocks": 64, "engine.block_size": 4,
                                              "replicas.stream_chunks_per_s": chunks_per_s})
        r = LLMReplica(cfg.replica_config())
        made.append(r)
        return r
    yield make
    for r in made:
        r.engine.shutdown(timeout=1.0)


def _req(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _collect(replica, rid: str, prompt: list[int], max_tokens: int) -> list:
    return [c async for c in replica.generate(_req(rid, prompt, max_tokens))]


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [3, 1, 4, 1, 5, 9, 2, 6]]


async def test_paced_streams_carry_exactly_the_engines_tokens_in_fewer_chunks(make_replica):
    unpaced = make_replica(0)
    reference = await asyncio.gather(*[_collect(unpaced, f"u{i}", p, 24) for i, p in enumerate(PROMPTS)])
    paced = make_replica(40.0)  # 4 streams: a chunk per stream every 0.1 s
    got = await asyncio.gather(*[_collect(paced, f"p{i}", p, 24) for i, p in enumerate(PROMPTS)])
    for ref, chunks in zip(reference, got):
        assert [t for c in chunks for t in c.token_ids] == [t for c in ref for t in c.token_ids]
        assert "".join(c.text for c in chunks) == "".join(c.text for c in ref)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
        assert chunks[-1].finish_reason == ref[-1].finish_reason
        assert len(chunks[0].token_ids) == 1  # the first token is not held back
        assert len(chunks) <= 12, [len(c.token_ids) for c in chunks]  # 24 tokens in at most half as many chunks


def test_pause_is_open_streams_over_the_budget(make_replica):
    r = make_replica(1000.0)
    r._inflight = 250
    assert r._stream_pause() == pytest.approx(0.25)
    r._inflight = 1  # one stream: under a millisecond, so tokens go out as they come
    assert r._stream_pause() == 0.0
    r.config.replicas.stream_chunks_per_s = 0
    r._inflight = 250
    assert r._stream_pause() == 0.0


async def test_a_consumer_leaving_mid_pause_frees_its_blocks_at_once(make_replica):
    r = make_replica(2.0)  # one stream: half a second between chunks
    gen = r.generate(_req("leaver", [1, 2, 3, 4, 5, 6, 7, 8, 9], 200))
    first = await gen.__anext__()
    assert first.token_ids
    assert r.engine.stats().kv_blocks_free < r.engine.stats().kv_blocks_total
    await gen.aclose()  # the client went away while the stream was pausing
    for _ in range(100):
        s = r.engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            break
        await asyncio.sleep(0.02)
    s = r.engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0
    assert r._inflight == 0
    assert s.kv_blocks_free == s.kv_blocks_total  # freed (its full blocks stay cached, evictable)
