"""GPU start-up (run on a CUDA machine; skipped with a reason elsewhere): after the engine's warm-up, the requests
a client sends compile no Triton kernel variant; warm-up leaves no trace; replicas sharing a GPU get pools sized
from their shares, whatever the other holds."""
from __future__ import annotations

import gc

import pytest
import torch

from replicas.engine.protocol import SamplingParams
from tests.fixtures.engine import greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


def _compiled_variants() -> dict[str, int]:
    """Per Triton kernel of the engine, the variants compiled so far in this process."""
    from triton.runtime.jit import JITFunction

    from replicas.engine.kernels import fused_ops, gemv, paged_attention
    out = {}
    for mod in (fused_ops, gemv, paged_attention):
        for name, fn in vars(mod).items():
            if isinstance(fn, JITFunction):
                caches = getattr(fn, "device_caches", {})
                out[name] = sum(len(c[0] if isinstance(c, tuple) else c) for c in caches.values())
    return out


@pytest.fixture(scope="module")
def eight_kv_heads(tiny_model_factory):
    # Eight KV heads, as Llama-3's: eager steps fill the GPU without key-range splits (a 2-KV-head toy would
    # split each prompt length differently, a kernel variant per length).
    return tiny_model_factory(hidden=512, num_heads=16, num_kv_heads=8)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_gpu_first_requests_compile_nothing_after_warmup(eight_kv_heads, enforce_eager):
    engine = make_engine(eight_kv_heads, device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=4096,
                         max_num_seqs=32, enforce_eager=enforce_eager)
    before = _compiled_variants()
    vocab = engine.vocab_size
    long, mid = random_prompts(1, vocab, 1500, 1500, seed=1)[0], random_prompts(1, vocab, 400, 400, seed=2)[0]
    short = random_prompts(20, vocab, 5, 90, seed=3)
    def sampled(n):
        return SamplingParams(max_tokens=n, temperature=0.7, top_p=0.9, top_k=20, seed=4, logprobs=1,
                              ignore_eos=True)
    arrivals = {0: [request("long", long, greedy(8))], 1: [request("mid", mid, greedy(8))],
                3: [request("hit", long[:1024] + [7] * 37, greedy(4))],
                4: [request(f"s{i}", p, greedy(3 + i) if i % 2 else sampled(3 + i)) for i, p in enumerate(short)]}
    run_all(engine, arrivals)
    assert engine.stats().prefix_hit_tokens == 1024
    after = _compiled_variants()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def test_gpu_warmup_leaves_no_trace(tiny_model_dir):
    stored = []
    engine = make_engine(tiny_model_dir, device="cuda", block_size=16, num_kv_blocks=1024,
                         on_blocks_stored=stored.extend)
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total and s.steps == s.computed_tokens == s.prefix_hit_tokens == 0
    assert stored == [] and engine.block_manager.cached == {}
    assert engine.runner.graphs.replays == {"decode": 0, "mixed": 0}
    prompt = random_prompts(1, engine.vocab_size, 40, 40, seed=9)[0]
    cold = make_engine(tiny_model_dir, device="cuda", block_size=16, num_kv_blocks=1024, warmup=False)
    assert tokens_of(run_all(engine, [request("a", prompt, greedy(8))])["a"]) == \
        tokens_of(run_all(cold, [request("a", prompt, greedy(8))])["a"])


def test_gpu_two_halves_of_one_device_get_equal_pools(tiny_model_dir):
    """Two replicas at num_gpus 0.5 (engine.gpu_share): the second starts while the first holds its pool and
    graphs, and still gets the same block count (not a fraction of what the first left free)."""
    free0, total = torch.cuda.mem_get_info()
    kw = dict(device="cuda", block_size=16, num_kv_blocks=None, gpu_share=0.5, kv_memory_fraction=0.3,
              warmup=False)
    a = make_engine(tiny_model_dir, **kw)
    assert torch.cuda.mem_get_info()[0] < free0 - 0.1 * total  # the first really took its share
    b = make_engine(tiny_model_dir, **kw)
    assert a.runner.num_kv_blocks == b.runner.num_kv_blocks
    per_block = a.runner.kv_cache[:, :, 0].numel() * a.runner.kv_cache.element_size()
    assert a.runner.num_kv_blocks * per_block <= 0.5 * total * 0.3
    assert a.runner.num_kv_blocks * per_block > 0.9 * 0.5 * total * 0.3  # weights, activations: a tiny model's
    del a, b
    gc.collect()
    torch.cuda.empty_cache()
