"""Greedy parity with transformers generate() (fp32, CPU) for every family and variant the engine serves, on
tiny random models built with transformers' own config classes: batches mixing prompt lengths (longer than the
sliding windows and than longrope's original context), chunked prefill, and prefix-cache hits."""
from __future__ import annotations

import pytest

from load_tests.tiny_model import build_family_model, family_configs
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

MAX_NEW = 8


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    cache = {}

    def make(family: str):
        if family not in cache:
            cache[family] = build_family_model(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return make


def _staggered(prompts, tag):
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 2, []).append(request(f"{tag}{i}", p, greedy(MAX_NEW)))
    return arrivals


@pytest.mark.parametrize("family", list(family_configs()))
def test_greedy_parity(family, family_dir):
    model_dir = family_dir(family)
    # A 16-token budget chunks every prompt longer than it; block size 4 makes the windows (8) two blocks.
    engine = make_engine(model_dir, max_num_batched_tokens=16)
    hf = HFReference(model_dir)
    vocab = engine.vocab_size
    prompts = random_prompts(4, vocab, 2, 45, seed=1)
    prefix = random_prompts(1, vocab, 13, 13, seed=2)[0]
    shared = random_prompts(3, vocab, 1, 9, seed=3, prefix=prefix)
    for rnd in range(2):  # the second round hits the prefix cache the first filled
        batch = prompts + shared if rnd == 0 else shared
        chunks = run_all(engine, _staggered(batch, f"r{rnd}-"))
        for i, p in enumerate(batch):
            assert tokens_of(chunks[f"r{rnd}-{i}"]) == hf.generate(p, MAX_NEW), f"round {rnd} prompt {i} " \
                f"(len {len(p)}) diverged"
    assert engine.stats().prefix_hit_tokens >= 3 * 12
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total


def test_sliding_window_frees_blocks_behind_the_window(family_dir):
    """Mistral, every layer sliding (window 8 = 2 blocks of 4): a sequence holds only the blocks its window
    and its step need, so a pool of 8 blocks (32 tokens) serves two ~60-token sequences at once, twice (the
    second round over whatever the first left cached), with transformers' tokens."""
    model_dir = family_dir("mistral-window")
    engine = make_engine(model_dir, num_kv_blocks=8, max_num_batched_tokens=8)
    hf = HFReference(model_dir)
    prompts = random_prompts(2, engine.vocab_size, 45, 50, seed=7)
    held = []
    for rnd in range(2):
        for i, p in enumerate(prompts):
            engine.add_request(request(f"{rnd}-{i}", p, greedy(MAX_NEW)))
        chunks: dict[str, list] = {}
        while engine.has_unfinished():
            for c in engine.step():
                chunks.setdefault(c.request_id, []).append(c)
            held += [sum(b >= 0 for b in s.block_table) for s in engine.scheduler.running]
        for i, p in enumerate(prompts):
            assert tokens_of(chunks[f"{rnd}-{i}"]) == hf.generate(p, MAX_NEW)
    assert max(held) <= 5  # window (2 blocks) + an 8-token step (2) + a partial block
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_sliding_window_admits_a_cached_prefix_longer_than_the_pool_holds(family_dir):
    """A prefix hit that covers most of the pool: the hit blocks behind the window are not taken back out of
    the free queue, so the request is admitted (it would otherwise wait forever) and matches transformers."""
    model_dir = family_dir("mistral-window")
    engine = make_engine(model_dir, num_kv_blocks=12, max_num_batched_tokens=16)
    hf = HFReference(model_dir)
    first = random_prompts(1, engine.vocab_size, 40, 40, seed=8)[0]
    run_all(engine, [request("a", first, greedy(1))])
    second = first + random_prompts(1, engine.vocab_size, 12, 12, seed=9)[0]
    before = engine.stats().prefix_hit_tokens
    chunks = run_all(engine, [request("b", second, greedy(MAX_NEW))], max_steps=200)
    assert engine.stats().prefix_hit_tokens - before == 40
    assert tokens_of(chunks["b"]) == hf.generate(second, MAX_NEW)
