"""GPU paths (run on a CUDA machine; skipped with a reason elsewhere): the Triton paged-attention kernel
against the reference attention in float64, the fused stages against their plain definitions, and the
engine on GPU (Triton attention, CUDA-graph decode with padded buckets) against transformers' greedy
output on the same weights."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.paged_metadata import build_step_tensors
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


def _random_step(g, num_decodes, prefills, block_size, max_ctx):
    """Decodes at random positions, then (start, n) prefill chunks; shuffled disjoint block tables."""
    shapes = [(int(torch.randint(0, max_ctx, (1,), generator=g)), 1) for _ in range(num_decodes)] + prefills
    need = [-(-(s + n) // block_size) for s, n in shapes]
    perm = torch.randperm(sum(need) + 7, generator=g).tolist()
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used:used + nb])
        used += nb
    return tables, [s for s, _ in shapes], [n for _, n in shapes], sum(need) + 7


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,num_decodes,prefills", [
    (32, 8, 128, 16, 37, [(0, 100), (4096, 32)]),  # Llama-3-8B shape: decodes, fresh prefill, long cached prefix
    (32, 8, 128, 16, 0, [(0, 700), (300, 400)]),  # >= 512 tokens: 64-row programs
    (9, 3, 64, 16, 5, [(19, 7)]),  # SmolLM2: 3 heads per KV head
    (14, 2, 64, 32, 3, [(0, 33)]),  # Qwen2-0.5B-like: 7 heads per KV head
    (8, 8, 64, 16, 64, []),  # MHA, decode only
])
def test_triton_kernel_matches_reference(dtype, heads, kv_heads, head_dim, block_size, num_decodes, prefills,
                                         splits):
    from replicas.engine.kernels.paged_attention import paged_attention as triton_attention
    g = torch.Generator().manual_seed(heads * 1000 + num_decodes)
    tables, starts, lengths, num_blocks = _random_step(g, num_decodes, prefills, block_size, 1500)
    t = sum(lengths)
    dev = torch.device("cuda")
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dev, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dev, dtype)
    q = torch.randn(t, heads, head_dim, generator=g).to(dev, dtype)
    scale = head_dim ** -0.5
    _, _, meta = build_step_tensors(tables, starts, lengths, block_size, heads // kv_heads, dev)
    meta.num_splits = splits  # short contexts leave some of the 4 splits without keys
    out = torch.full_like(q, float("nan"))
    triton_attention(q, k_cache, v_cache, meta, scale, out=out)
    torch.cuda.synchronize()
    # Reference: the CPU path (gather + SDPA) in float64; its store of k/v rewrites the same values.
    ref_meta = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"))
    kc, vc = k_cache.double().cpu(), v_cache.double().cpu()
    kf = kc.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    vf = vc.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    ref = paged_attention(q.double().cpu(), kf, vf, kc, vc, ref_meta, scale)
    assert not out.isnan().any(), "rows left unwritten"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_store_kv_kernel_writes_each_token_to_its_slot():
    from replicas.engine.kernels.paged_attention import store_kv
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(50, 48, 128, generator=g).cuda().bfloat16()  # v is a strided view, like the model's
    k, v = qkv[:, 32:40].contiguous(), qkv[:, 40:48]
    k_cache = torch.randn(20, 16, 8, 128, generator=g).cuda().bfloat16()
    v_cache = torch.randn(20, 16, 8, 128, generator=g).cuda().bfloat16()
    slots = torch.randperm(320, generator=g)[:50].cuda()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k.view(-1, 8, 128).index_copy_(0, slots, k)
    ref_v.view(-1, 8, 128).index_copy_(0, slots, v)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernels_match_plain_definitions(dtype):
    """The Triton kernels behind @fused against the torch definitions (the CPU path) on the same GPU inputs,
    with q/k/v as strided views of one qkv output, as in the model."""
    from replicas.engine.models import layers, llama
    torch.manual_seed(0)
    t, hidden = 37, 4096
    x = torch.randn(t, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    torch.testing.assert_close(layers._rms_norm(x, w, 1e-5), layers._rms_norm.__wrapped__(x, w, 1e-5))
    torch.testing.assert_close(layers._add_rms_norm(x, r, w, 1e-5), layers._add_rms_norm.__wrapped__(x, r, w, 1e-5))
    h = torch.randn(t, 2 * 14336, device="cuda", dtype=dtype)
    torch.testing.assert_close(llama._silu_and_mul(h), llama._silu_and_mul.__wrapped__(h))
    qkv = torch.randn(t, 48 * 128, device="cuda", dtype=dtype)
    q, k = qkv[:, :32 * 128].view(t, 32, 128), qkv[:, 32 * 128:40 * 128].view(t, 8, 128)
    qn = torch.randn(128, device="cuda", dtype=dtype)  # Qwen3's per-head q/k norm on a strided view
    torch.testing.assert_close(layers._rms_norm(q, qn, 1e-6), layers._rms_norm.__wrapped__(q, qn, 1e-6))
    rope = layers.RotaryEmbedding(128, 8192, 500000.0, None).cuda()
    pos = torch.randint(0, 8192, (t,), device="cuda")
    torch.testing.assert_close(layers._apply_rotary(rope.cos_sin, pos, q, k),
                               layers._apply_rotary.__wrapped__(rope.cos_sin, pos, q, k))


@pytest.fixture(scope="module")
def hf_llama(tiny_model_dir):
    return HFReference(tiny_model_dir)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_gpu_engine_greedy_equals_transformers(tiny_model_dir, hf_llama, enforce_eager):
    """fp32 on GPU (no tf32): staggered arrivals give decode batches of odd sizes (padded graph buckets),
    mixed prefill+decode steps (padded mixed-step graphs), prefix-cache hits and chunked prefill."""
    engine = make_engine(tiny_model_dir, device="cuda", dtype="float32", block_size=16, num_kv_blocks=64,
                         max_num_seqs=24, max_num_batched_tokens=48, enforce_eager=enforce_eager)
    prefix = random_prompts(1, engine.vocab_size, 40, 40, seed=5)[0]
    # The 300-token prompt decodes past 256 positions: the small-batch decode graphs with key-range splits.
    prompts = random_prompts(10, engine.vocab_size, 1, 70, seed=6) + \
        random_prompts(9, engine.vocab_size, 1, 12, seed=7, prefix=prefix) + \
        random_prompts(1, engine.vocab_size, 300, 300, seed=8)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 3, []).append(request(i, p, greedy(12)))
    chunks = run_all(engine, arrivals)
    for i, p in enumerate(prompts):
        assert tokens_of(chunks[str(i)]) == hf_llama.generate(p, 12), f"prompt {i} (len {len(p)}) diverged"
    assert engine.stats().prefix_hit_tokens > 0
    if enforce_eager:
        assert engine.runner.graphs is None
    else:
        # Decode steps and the small mixed steps (all <= 48 tokens here) both replayed graphs.
        assert engine.runner.graphs.replays["decode"] > 0 and engine.runner.graphs.replays["mixed"] > 0
