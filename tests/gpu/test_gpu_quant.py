"""Quantisation on GPU (run on a CUDA machine, Hopper for FP8; skipped with a reason elsewhere): the Triton GEMV
with int8 / FP8 weights against the dequantised matmul, the FP8 KV cache's Triton store and paged attention against
the CPU path, and the engine on GPU with int8 / fp8 weights and an FP8 KV pool against the same engine on CPU."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.paged_metadata import build_step_tensors
from replicas.engine.quant import ops as qops
from tests.fixtures.engine import greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


def _fp8_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_ok(), reason="FP8 needs compute capability >= 8.9 (Ada / Hopper)")


@pytest.mark.parametrize("method", ["int8", pytest.param("fp8", marks=needs_fp8)])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k,silu,norm", [(6144, 4096, False, True), (4096, 14336, False, False),
                                           (2 * 1536, 576, True, True), (960, 576, False, False)])
def test_gemv_with_quantised_weights_matches_the_dequantised_matmul(method, m, n, k, silu, norm):
    from replicas.engine.kernels.gemv import gemv, norm_linear
    from replicas.engine.models.layers import _add_rms_norm
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).cuda().bfloat16()
    res = torch.randn(m, k, generator=g).cuda().bfloat16()
    nw = (1 + 0.1 * torch.randn(k, generator=g)).cuda().bfloat16()
    q, s = qops.quantize_rows(torch.randn(n, k, generator=g).cuda(), qops.STORAGE[method])
    w = qops.dequantize_rows(q, s)  # fp32
    if norm:
        out, res_out = norm_linear(x, res, nw, 1e-5, q, None, silu=silu, scale=s)
        h, want_res = _add_rms_norm.__wrapped__(x, res, nw, 1e-5)
        assert torch.equal(res_out, want_res)
    else:
        out, h = gemv(x, q, None, silu=silu, scale=s), x
    ref = h.float() @ w.T
    if silu:
        gate, up = ref.chunk(2, -1)
        ref = torch.nn.functional.silu(gate) * up
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@needs_fp8
def test_fp8_w8a8_linear_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 512, generator=g)
    q, s = qops.quantize_rows(torch.randn(256, 512, generator=g), qops.FP8)
    cpu = qops.linear(x, q, s, None, w8a8=True)
    gpu = qops.linear(x.cuda().bfloat16(), q.cuda(), s.cuda(), None, w8a8=True)  # 300 rows: _scaled_mm
    assert ((gpu.float().cpu() - cpu).norm() / cpu.norm()) < 1e-2


@needs_fp8
def test_fp8_store_kv_kernel_writes_the_cpu_bytes():
    from replicas.engine.kernels.paged_attention import store_kv
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(50, 48, 128, generator=g).cuda().bfloat16() * 40  # some values past 448 * scale: clamped
    k, v = qkv[:, 32:40].contiguous(), qkv[:, 40:48]
    k_cache = torch.zeros(20, 16, 8, 128, dtype=qops.FP8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(320, generator=g)[:50].cuda()
    store_kv(k, v, k_cache, v_cache, slots, 0.5, 0.25)
    rk = qops.quantize_kv(k.cpu(), 0.5)
    rv = qops.quantize_kv(v.cpu(), 0.25)
    got_k = k_cache.view(-1, 8, 128)[slots].cpu()
    got_v = v_cache.view(-1, 8, 128)[slots].cpu()
    assert torch.equal(got_k.view(torch.uint8), rk.view(torch.uint8))
    assert torch.equal(got_v.view(torch.uint8), rv.view(torch.uint8))


@needs_fp8
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("heads,kv_heads,head_dim,num_decodes,prefills", [
    (32, 8, 128, 37, [(0, 100), (4096, 32)]),  # Llama-3-8B shape
    (9, 3, 64, 5, [(19, 7)]),  # SmolLM2
])
def test_triton_attention_on_an_fp8_pool_matches_the_cpu_path(heads, kv_heads, head_dim, num_decodes, prefills,
                                                               splits):
    from replicas.engine.kernels.paged_attention import paged_attention as triton_attention
    from tests.gpu.test_gpu_engine import _random_step
    g = torch.Generator().manual_seed(heads + num_decodes)
    tables, starts, lengths, num_blocks = _random_step(g, num_decodes, prefills, 16, 1500)
    t = sum(lengths)
    k_scale, v_scale = 0.05, 0.02
    k_cache = qops.quantize_kv(torch.randn(num_blocks, 16, kv_heads, head_dim, generator=g), k_scale)
    v_cache = qops.quantize_kv(torch.randn(num_blocks, 16, kv_heads, head_dim, generator=g), v_scale)
    q = torch.randn(t, heads, head_dim, generator=g).bfloat16()
    dev = torch.device("cuda")
    _, _, meta = build_step_tensors(tables, starts, lengths, 16, heads // kv_heads, dev)
    meta.num_splits = splits
    out = torch.full_like(q.cuda(), float("nan"))
    triton_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), meta, head_dim ** -0.5, out=out, k_scale=k_scale,
                     v_scale=v_scale)
    torch.cuda.synchronize()
    ref_meta = AttentionMetadata.build(tables, starts, lengths, 16, torch.device("cpu"))
    kd, vd = k_cache.double() * k_scale, v_cache.double() * v_scale
    kf = kd.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    vf = vd.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    ref = paged_attention(q.double(), kf, vf, kd, vd, ref_meta, head_dim ** -0.5)
    assert not out.isnan().any()
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("kw", [{"quantization": "int8"},
                                pytest.param({"quantization": "fp8"}, marks=needs_fp8),
                                pytest.param({"quantization": "fp8", "fp8_scheme": "weight_only"}, marks=needs_fp8),
                                pytest.param({"kv_cache_dtype": "fp8"}, marks=needs_fp8)],
                         ids=["int8", "fp8-w8a8", "fp8-weight-only", "kv-fp8"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_gpu_engine_quantised_matches_cpu_engine(tiny_model_dir, kw, enforce_eager):
    """Same scheme, same weights: the GPU paths (GEMV, _scaled_mm, Triton FP8 KV) take the CPU path's greedy tokens
    (fp32 on both; FP8 rounding can flip a near tie, so all but one prompt)."""
    prompts = random_prompts(8, 472, 2, 60, seed=41)
    reqs = lambda: [request(i, p, greedy(8)) for i, p in enumerate(prompts)]  # noqa: E731
    gpu = run_all(make_engine(tiny_model_dir, device="cuda", dtype="float32", block_size=16, num_kv_blocks=64,
                              enforce_eager=enforce_eager, **kw), reqs())
    cpu = run_all(make_engine(tiny_model_dir, dtype="float32", block_size=16, num_kv_blocks=64, **kw), reqs())
    same = sum(tokens_of(gpu[str(i)]) == tokens_of(cpu[str(i)]) for i in range(len(prompts)))
    assert same >= len(prompts) - 1, same
