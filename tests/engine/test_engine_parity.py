"""Greedy output of our engine equals transformers generate() token for token, on every engine path:
continuous batching with staggered arrivals, prefix hits, chunked prefill, preemption, other
architectures, Llama-3 RoPE scaling, sharded checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

MAX_NEW = 10


@pytest.fixture(scope="module")
def hf_llama(tiny_model_dir):
    return HFReference(tiny_model_dir)


def _staggered(prompts, max_new=MAX_NEW):
    """Two requests arrive per step: later ones join a batch that is already decoding."""
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 2, []).append(request(i, p, greedy(max_new)))
    return arrivals


def _assert_parity(engine, hf, prompts, max_new=MAX_NEW):
    chunks = run_all(engine, _staggered(prompts, max_new))
    for i, p in enumerate(prompts):
        assert tokens_of(chunks[str(i)]) == hf.generate(p, max_new), f"prompt {i} (len {len(p)}) diverged"
    _assert_no_leak(engine)
    return chunks


def _assert_no_leak(engine):
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_batch_of_16_staggered(tiny_model_dir, hf_llama):
    engine = make_engine(tiny_model_dir)
    prompts = random_prompts(16, engine.vocab_size, 1, 40, seed=1)
    _assert_parity(engine, hf_llama, prompts)
    assert engine.stats().prefix_hit_tokens == 0


def test_shared_prefixes_hit_cache(tiny_model_dir, hf_llama):
    engine = make_engine(tiny_model_dir)
    prefix = random_prompts(1, engine.vocab_size, 22, 22, seed=2)[0]
    prompts = random_prompts(16, engine.vocab_size, 1, 12, seed=3, prefix=prefix)
    _assert_parity(engine, hf_llama, prompts)
    # 22 shared tokens = 5 full blocks of 4; the first two requests arrive together and miss.
    assert engine.stats().prefix_hit_tokens >= 14 * 20


def test_repeated_block_aligned_prompts_with_router_hashes(tiny_model_dir, hf_llama):
    # The ingress sends the prompt's full-block hashes; a prompt that fills its last block, sent again
    # (retries, identical requests), is cached whole and must still compute its last block to sample.
    from replicas.engine.hashing import block_hashes
    engine = make_engine(tiny_model_dir)
    prompts = random_prompts(4, engine.vocab_size, 12, 12, seed=11)  # 3 full blocks of 4 each
    hashes = [block_hashes(p, 4, engine.block_manager.extra_key) for p in prompts]
    for rnd in range(2):
        chunks = run_all(engine, [request(f"{rnd}-{i}", p, greedy(MAX_NEW), block_hashes=h)
                                  for i, (p, h) in enumerate(zip(prompts, hashes))])
        assert not engine.take_failures()
        for i, p in enumerate(prompts):
            assert tokens_of(chunks[f"{rnd}-{i}"]) == hf_llama.generate(p, MAX_NEW)
    assert engine.stats().prefix_hit_tokens == 4 * 8  # round 2 only: two of each prompt's three blocks
    _assert_no_leak(engine)


def test_chunked_prefill_budget_smaller_than_prompt(tiny_model_dir, hf_llama):
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=8)
    prompts = random_prompts(16, engine.vocab_size, 9, 45, seed=4)
    _assert_parity(engine, hf_llama, prompts)


def test_preemption_with_small_pool(tiny_model_dir, hf_llama):
    # 16 requests of up to 50 tokens need up to 13 blocks each; 24 blocks hold two or three.
    engine = make_engine(tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=32)
    prompts = random_prompts(16, engine.vocab_size, 10, 40, seed=5)
    _assert_parity(engine, hf_llama, prompts)
    assert engine.stats().num_preemptions > 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_variants(tiny_model_factory, arch):
    model_dir = tiny_model_factory(arch=arch)
    engine = make_engine(model_dir, max_num_batched_tokens=16)
    prompts = random_prompts(6, engine.vocab_size, 3, 30, seed=6)
    _assert_parity(engine, HFReference(model_dir), prompts)


def test_llama3_rope_scaling(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "llama3-rope"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    # original context 64 (< the prompts' positions) so low, medium and high frequencies all get scaled.
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    engine = make_engine(model_dir)
    assert engine.runner.model.args.rope_scaling["rope_type"] == "llama3"
    prompts = random_prompts(4, engine.vocab_size, 60, 90, seed=7)
    hf = HFReference(model_dir)
    assert hf.model.config.rope_parameters["rope_type"] == "llama3"
    _assert_parity(engine, hf, prompts)


def test_sharded_checkpoint(tiny_model_dir, tmp_path, hf_llama):
    model_dir = tmp_path / "sharded"
    hf_llama.model.save_pretrained(str(model_dir), max_shard_size="100KB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir / f.name)
    assert (model_dir / "model.safetensors.index.json").exists()
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    engine = make_engine(model_dir)
    prompts = random_prompts(4, engine.vocab_size, 3, 20, seed=8)
    _assert_parity(engine, hf_llama, prompts)


def test_shared_512_token_prefix_computes_only_new_tokens(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=16, max_num_batched_tokens=1024)
    prefix = random_prompts(1, engine.vocab_size, 512, 512, seed=9)[0]
    first, second = random_prompts(2, engine.vocab_size, 20, 20, seed=10, prefix=prefix)
    run_all(engine, [request("a", first, greedy(4))])
    before = engine.stats()
    chunks = run_all(engine, [request("b", second, greedy(4))])
    after = engine.stats()
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == 512
    # 20 new prompt tokens in the prefill, then one token per remaining decode step.
    assert after.computed_tokens - before.computed_tokens == 20 + 3
    assert chunks["b"][-1].usage.cached_prompt_tokens == 512
