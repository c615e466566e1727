"""The Triton GEMV path for decode rows (`replicas.engine.kernels.gemv`, routed by `replicas.engine.gemv`):
the kernels against the torch definitions (F.linear, the norm and SiLU-mul functions of the CPU path) on GPU,
a decoder layer through it against the plain layer, and the routing on CPU (never taken there)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replicas.engine import gemv as routing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _tol(dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


def test_cpu_never_takes_the_gemv_path():
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    assert not routing.applies(x, w)
    assert torch.equal(routing.linear(x, w), F.linear(x, w))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 576), (50, 100)])
def test_gemv_matches_linear(dtype, m, n, k):
    from replicas.engine.kernels.gemv import gemv
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    ref = F.linear(x.double(), w.double())
    assert _err(gemv(x, w), ref) < _tol(dtype)
    assert _err(gemv(x, w, b), ref + b.double()) < _tol(dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("n,k", [(6144, 4096), (2 * 14336, 4096), (2 * 1536, 576), (2 * 50, 96)])
def test_norm_linear_matches_plain_stages(dtype, m, with_residual, n, k):
    """Residual add + RMSNorm prologue (and SiLU-mul epilogue) against `_add_rms_norm`/`_rms_norm`, F.linear
    and `_silu_and_mul` as written (the CPU path's functions, run here on the GPU's tensors)."""
    from replicas.engine.kernels.gemv import norm_linear
    from replicas.engine.models import layers, llama
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    r = torch.randn(m, k, device="cuda", dtype=dtype, generator=g) if with_residual else None
    nw = torch.randn(k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    if with_residual:
        h, res = layers._add_rms_norm.__wrapped__(x, r, nw, 1e-5)
    else:
        h, res = layers._rms_norm.__wrapped__(x, nw, 1e-5), x
    for bias in (None, b):
        y, res_out = norm_linear(x, r, nw, 1e-5, w, bias)
        assert torch.equal(res_out, res)
        assert _err(y, F.linear(h.double(), w.double(), None if bias is None else bias.double())) < _tol(dtype)
        y, res_out = norm_linear(x, r, nw, 1e-5, w, bias, silu=True)
        assert torch.equal(res_out, res) and y.shape == (m, n // 2)
        ref = llama._silu_and_mul.__wrapped__(F.linear(h.double(), w.double(),
                                                       None if bias is None else bias.double()))
        assert _err(y, ref) < _tol(dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 4])
def test_decoder_layer_gemv_path_matches_plain_path(dtype, m, monkeypatch):
    """One Llama-shaped decoder layer (small) with attention stubbed out: the fused GEMV path against the plain
    path (cuBLAS + separate Triton norm / SiLU-mul) on the same weights."""
    from replicas.engine.models import llama
    from replicas.engine.models.args import ModelArgs
    args = ModelArgs(model_type="llama", hidden_size=512, intermediate_size=1536, num_layers=1, num_heads=8,
                     num_kv_heads=2, head_dim=64, vocab_size=1000, rms_norm_eps=1e-5, rope_theta=10000.0,
                     rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False, qkv_bias=True,
                     o_bias=False, mlp_bias=True, qk_norm=False, eos_token_ids=(0,))
    torch.manual_seed(0)
    layer = llama.DecoderLayer(args, llama.TPInfo()).to("cuda", dtype)
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    for ln in (layer.input_layernorm, layer.post_attention_layernorm):
        ln.weight.data.normal_(1, 0.1)
    # Attention stub: o_proj of q (keeps the qkv rows that the layer computed in play).
    monkeypatch.setattr(layer.self_attn, "attend",
                        lambda pos, qkv, meta: layer.self_attn.o_proj(qkv[:, :512].contiguous()))
    monkeypatch.setattr(layer.self_attn, "forward",
                        lambda pos, x, meta: layer.self_attn.attend(pos, layer.self_attn.qkv_proj(x), meta))
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    r = torch.randn(m, 512, device="cuda", dtype=dtype)
    monkeypatch.setattr(routing, "MAX_M", 16)
    monkeypatch.setattr(routing, "ENABLED", True)
    assert routing.applies(x, layer.mlp.gate_up_proj.weight)
    fused = [layer(None, x, res, None) for res in (r, None)]
    monkeypatch.setattr(routing, "ENABLED", False)
    plain = [layer(None, x, res, None) for res in (r, None)]
    for (yf, rf), (yp, rp) in zip(fused, plain):
        assert _err(rf, rp) < _tol(dtype)  # attention output + residual: o_proj's rounding may differ
        assert _err(yf, yp) < _tol(dtype)


@cuda
def test_block_sizes_follow_the_device(monkeypatch):
    from replicas.engine.kernels import gemv as kernels
    assert kernels.config_for(1, 6144, 4096, "NVIDIA H100 80GB HBM3") == kernels.CONFIGS[(6144, 4096)]
    assert kernels.config_for(1, 6144, 4096, "NVIDIA H200") == kernels.DEVICE_CONFIGS["H200"][(6144, 4096)]
    assert kernels.config_for(1, 14336, 4096, "NVIDIA H200") == kernels.CONFIGS[(14336, 4096)]  # not in its sweep
    assert kernels.config_for(1, 77, 4096, "NVIDIA H200") == kernels.DEFAULT_CONFIG
    monkeypatch.setitem(kernels.OVERRIDES, (6144, 4096), (8, 512, 4))  # a sweep's result has the last word
    kernels.one_row_table.cache_clear()
    try:
        assert kernels.config_for(1, 6144, 4096, "NVIDIA H200") == (8, 512, 4)
    finally:
        monkeypatch.undo()
        kernels.one_row_table.cache_clear()
