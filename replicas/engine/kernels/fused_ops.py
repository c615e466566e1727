"""The small stages between the matmuls as one Triton launch each: RMSNorm (with its residual add), rotary on
q and k together, SiLU-and-mul. Same arithmetic as the torch definitions in `models/layers.py` and
`models/llama.py` (fp32 inside, rounded where torch rounds), which stay the CPU path and the tests' reference.

One launch matters twice: CUDA-graph decode replays ~10 kernels per layer instead of ~40, and eager steps
(prefill chunks, a short chunk over a cached prefix) pay one Triton launch instead of a torch.compile
region's guards and wrapper.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (xf * rstd).to(x.dtype) * w, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    shape = x.shape
    x2 = _rows(x)
    n = x2.shape[1]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        r2 = res_out = x2  # unused
    else:
        r2 = _rows(residual)
        res_out = torch.empty_like(out)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                     res_out.stride(0), n, eps, HAS_RES=residual is not None, BLOCK=block,
                                     num_warps=min(16, max(1, block // 256)))
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual)."""
    return _norm(x, residual, weight, eps)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xt, stride_xh, stride_ot, stride_oh, t, cos, sin, offs_d, d_ok,
                  NH: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    m = (offs_h < NH)[:, None] & d_ok[None, :]
    src = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    dst = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=m)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dtype), mask=m)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                   NQ: tl.constexpr, NK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr, qo_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, t, cos, sin, offs_d, d_ok,
                  NQ, BLOCK_HQ, HALF)
    _rotate_heads(k_ptr, ko_ptr, stride_kt, stride_kh, stride_kot, stride_koh, t, cos, sin, offs_d, d_ok,
                  NK, BLOCK_HK, HALF)


def apply_rotary(cos_sin: torch.Tensor, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """q [T, H, D], k [T, KVH, D] (last dim contiguous) -> rotated copies; cos_sin [max_pos, D] fp32."""
    t, nq, d = q.shape
    nk = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.dtype == torch.float32
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t,)](q, k, qo, ko, cos_sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_sin.stride(0),
                             NQ=nq, NK=nk, BLOCK_HQ=triton.next_power_of_2(nq), BLOCK_HK=triton.next_power_of_2(nk),
                             HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), num_warps=4)
    return qo, ko


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (g / (1.0 + tl.exp(-g))).to(gate.dtype) * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] = [gate | up] -> silu(gate) * up [..., N]."""
    shape = x.shape
    x2 = _rows(x)
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n,
                                                                   BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], n)
