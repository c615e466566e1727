"""AsyncLLMEngine: concurrent streams, cancellation frees blocks, a bad request fails alone, the loop
survives a failing forward and ticks when idle."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from replicas.engine.async_engine import AsyncLLMEngine, EngineShutdown
from replicas.engine.config import EngineConfig
from replicas.engine.protocol import EngineError, SamplingParams
from tests.fixtures.engine import greedy, make_engine, random_prompts, request, run_all, text_of, tokens_of
from tests.fixtures.wait import wait_until, wait_until_async

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def aengine(tiny_model_dir):
    e = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128, block_size=4, device="cpu"))
    yield e
    e.shutdown()
    assert not e.is_alive()


async def _collect(engine, req):
    return [c async for c in engine.generate(req)]


async def test_concurrent_streams_match_sync_engine(tiny_model_dir, aengine):
    prompts = random_prompts(6, aengine.engine.vocab_size, 3, 25, seed=21)
    reqs = [request(i, p, greedy(8)) for i, p in enumerate(prompts)]
    results = await asyncio.gather(*(_collect(aengine, r) for r in reqs))
    expected = run_all(make_engine(tiny_model_dir, num_kv_blocks=128), [r.model_copy() for r in reqs])
    for r, chunks in zip(reqs, results):
        assert tokens_of(chunks) == tokens_of(expected[r.request_id])
        assert chunks[-1].usage is not None and chunks[-1].finish_reason == "length"
    assert aengine.engine.stats().steps < 6 * 8  # they were batched, not run one after another


async def _lagging(engine, req):
    """Collect a stream whose consumer stops pulling after the first chunk until the engine has generated
    the whole request: everything after the first chunk piles up in the stream's queue."""
    chunks = []
    async for c in engine.generate(req):
        if not chunks:
            await asyncio.to_thread(wait_until, lambda: not engine.engine.has_unfinished(), 30, 0.005,
                                    "the engine to finish")
        chunks.append(c)
    return chunks


async def test_lagging_consumer_gets_coalesced_chunks(tiny_model_dir, aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 12, 12, seed=29)[0]
    req = request("lag", prompt, greedy(24, logprobs=2))
    chunks = await _lagging(aengine, req)
    want = run_all(make_engine(tiny_model_dir, num_kv_blocks=128), [req.model_copy()])["lag"]
    assert len(chunks) < len(want)  # several tokens per chunk once the consumer fell behind
    assert tokens_of(chunks) == tokens_of(want) and text_of(chunks) == text_of(want)
    assert [lp.token_id for c in chunks for lp in c.logprobs] == tokens_of(want)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24


async def test_coalescing_keeps_choices_apart(tiny_model_dir, aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 12, 12, seed=30)[0]
    req = request("n2", prompt, SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=5, ignore_eos=True))
    chunks = await _lagging(aengine, req)
    want = run_all(make_engine(tiny_model_dir, num_kv_blocks=128), [req.model_copy()])["n2"]
    assert len(chunks) < len(want)
    for i in (0, 1):
        assert tokens_of(chunks, i) == tokens_of(want, i) and len(tokens_of(chunks, i)) == 20
    assert sum(c.finish_reason == "length" for c in chunks) == 2 and chunks[-1].usage.completion_tokens == 40


async def test_cancelled_consumer_aborts_and_frees_blocks(aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 20, 20, seed=22)[0]
    got = []

    async def consume():
        async for c in aengine.generate(request("long", prompt, greedy(400))):
            got.append(c)

    task = asyncio.create_task(consume())
    await wait_until_async(lambda: len(got) >= 3, 10, 0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    total = aengine.stats().kv_blocks_total
    await wait_until_async(lambda: not aengine.engine.has_unfinished() and aengine.stats().kv_blocks_free == total,
                           10, 0.01)


async def test_closed_generator_aborts(aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 10, 10, seed=23)[0]
    gen = aengine.generate(request("closed", prompt, greedy(400)))
    await gen.__anext__()
    await gen.aclose()
    await wait_until_async(lambda: not aengine.engine.has_unfinished(), 10, 0.01)


async def test_bad_request_fails_alone(aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 10, 10, seed=24)[0]
    bad = request("bad", [5] * aengine.max_model_len, greedy(4))
    good, failed = await asyncio.gather(_collect(aengine, request("good", prompt, greedy(6))),
                                        _collect(aengine, bad), return_exceptions=True)
    assert isinstance(failed, EngineError) and "context length" in str(failed)
    assert len(tokens_of(good)) == 6


async def test_forward_error_fails_batch_loop_survives(aengine, monkeypatch):
    prompt = random_prompts(1, aengine.engine.vocab_size, 10, 10, seed=25)[0]
    model = aengine.engine.runner.model
    real = model.forward

    def broken(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        await _collect(aengine, request("a", prompt, greedy(4)))
    monkeypatch.setattr(model, "forward", real)
    assert len(tokens_of(await _collect(aengine, request("b", prompt, greedy(4))))) == 4
    assert aengine.is_alive()


async def test_abort_from_outside_ends_the_stream(aengine):
    prompt = random_prompts(1, aengine.engine.vocab_size, 10, 10, seed=26)[0]
    got = []

    async def consume():
        async for c in aengine.generate(request("x", prompt, greedy(400))):
            got.append(c)

    task = asyncio.create_task(consume())
    await wait_until_async(lambda: len(got) >= 2, 10, 0.01)
    aengine.abort("x")
    await asyncio.wait_for(task, 10)
    assert got[-1].finish_reason == "abort" and got[-1].usage.completion_tokens >= 2


async def test_heartbeat_ticks_when_idle(aengine):
    first = aengine.heartbeat
    await asyncio.sleep(1.2)
    assert aengine.heartbeat > first
    assert time.monotonic() - aengine.heartbeat < 1.0


async def test_shutdown_fails_open_streams(tiny_model_dir):
    e = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128, block_size=4, device="cpu"))
    prompt = random_prompts(1, e.engine.vocab_size, 10, 10, seed=27)[0]
    task = asyncio.create_task(_collect(e, request("s", prompt, greedy(400))))
    await wait_until_async(lambda: e.engine.has_unfinished(), 10, 0.01)
    await asyncio.to_thread(e.shutdown)
    with pytest.raises(EngineShutdown):
        await asyncio.wait_for(task, 10)
    with pytest.raises(EngineShutdown):
        await _collect(e, request("late", prompt))


async def test_add_racing_shutdown_is_failed_not_lost(tiny_model_dir):
    e = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, block_size=4, device="cpu"))
    prompt = random_prompts(1, e.engine.vocab_size, 10, 10, seed=28)[0]
    model, entered, gate = e.engine.runner.model, threading.Event(), threading.Event()
    real = model.forward

    def held(*a, **k):
        entered.set()
        gate.wait(10)
        return real(*a, **k)
    model.forward = held
    first = asyncio.create_task(_collect(e, request("a", prompt, greedy(4))))
    assert await asyncio.to_thread(entered.wait, 10)
    second = asyncio.create_task(_collect(e, request("b", prompt, greedy(4))))
    await asyncio.sleep(0.05)  # b's add is queued while the loop is inside a step
    stopper = asyncio.create_task(asyncio.to_thread(e.shutdown))
    await asyncio.sleep(0.05)
    gate.set()
    await stopper
    for task in (first, second):
        with pytest.raises(EngineShutdown):
            await asyncio.wait_for(task, 10)
