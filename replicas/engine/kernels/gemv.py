"""Triton GEMV for a few rows (decode batches): y = x W^T with W [N, K] row-major, no split-K, and two fusions
that save launches per layer:

- `norm_linear`: the residual add and RMSNorm of the pre-norm block in the prologue. Every program recomputes
  the rstd of its input rows (K values each, read from L2), normalises each K-chunk as it goes, and program 0
  writes the new residual (x + residual). Same rounding as `models/layers.py`'s `_add_rms_norm` / `_rms_norm`.
- `silu=True`: the gate/up projection with SiLU-and-mul in the epilogue. W holds [gate rows | up rows]
  (MergedColumnParallelLinear's layout, unchanged); each program computes matching gate and up rows and writes
  silu(gate) * up, rounded like `models/llama.py`'s `_silu_and_mul`.

Quantised weights (int8 or FP8 E4M3, `replicas.engine.quant`): the 1-byte rows are read and converted in
registers, and the per-row scale multiplies the fp32 accumulator before bias and SiLU (`HAS_SCALE`).

One row (M == 1) multiplies and sums in registers; 2..16 rows go through tl.dot with the rows padded to 16.
Every program streams BLOCK_N whole rows of W: a grid of N / BLOCK_N programs, no partial sums, no reduce
kernel. Routing (which calls take this path) lives in `replicas.engine.gemv`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from replicas.engine.envs import SWITCHES


@triton.jit
def _load_x(x_ptr, res_ptr, stride_xm, stride_rm, offs_m, m_ok, offs_k, k_ok, HAS_RES: tl.constexpr):
    m2 = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m2, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=m2, other=0.0)
    return x


@triton.jit
def _load_w(w_rows, offs_k, n_ok, k_ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
    return tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _dot(x, w, acc, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T."""
    if BLOCK_M == 1:
        return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    w = w.to(x.dtype)  # quantised weights: int8 / E4M3 values are exact in bf16, fp16 and fp32
    if IEEE:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, s_ptr,
                 M, N, K, stride_xm, stride_rm, stride_wn, stride_om, stride_rom, up_off, eps,
                 NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 HAS_SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, IEEE: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_kb = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty

    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if SILU:
        w_rows2 = w_ptr + (up_off + offs_n).to(tl.int64)[:, None] * stride_wn
    if ONE_PASS:
        # K <= BLOCK_K: the input rows are read once, their rstd taken, and the weights loaded in one go.
        k_ok = offs_kb < K
        w = _load_w(w_rows, offs_kb, n_ok, k_ok, EVEN_K and EVEN_N)
        if SILU:
            w2 = _load_w(w_rows2, offs_kb, n_ok, k_ok, EVEN_K and EVEN_N)
        x = _load_x(x_ptr, res_ptr, stride_xm, stride_rm, offs_m, m_ok, offs_kb, k_ok, HAS_RES)
        if NORM:
            if HAS_RES:
                if pid == 0:
                    tl.store(res_out_ptr + offs_m[:, None] * stride_rom + offs_kb[None, :], x,
                             mask=m_ok[:, None] & k_ok[None, :])
            xf = x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xf * xf, 1) / K + eps)
            nw = tl.load(nw_ptr + offs_kb, mask=k_ok, other=0.0)
            x = (xf * rstd[:, None]).to(dtype) * nw[None, :]
        acc = _dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_M, IEEE)
        if SILU:
            acc2 = _dot(x, w2, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_M, IEEE)
    else:
        if NORM:
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_kb
                k_ok = offs_k < K
                x = _load_x(x_ptr, res_ptr, stride_xm, stride_rm, offs_m, m_ok, offs_k, k_ok, HAS_RES)
                if HAS_RES:
                    if pid == 0:
                        tl.store(res_out_ptr + offs_m[:, None] * stride_rom + offs_k[None, :], x,
                                 mask=m_ok[:, None] & k_ok[None, :])
                xf = x.to(tl.float32)
                ss += tl.sum(xf * xf, 1)
            rstd = tl.rsqrt(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if SILU:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_kb
            k_ok = offs_k < K
            w = _load_w(w_rows, offs_k, n_ok, k_ok, EVEN_K and EVEN_N)
            if SILU:
                w2 = _load_w(w_rows2, offs_k, n_ok, k_ok, EVEN_K and EVEN_N)
            x = _load_x(x_ptr, res_ptr, stride_xm, stride_rm, offs_m, m_ok, offs_k, k_ok, HAS_RES)
            if NORM:
                nw = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0)
                x = (x.to(tl.float32) * rstd[:, None]).to(dtype) * nw[None, :]
            acc = _dot(x, w, acc, BLOCK_M, IEEE)
            if SILU:
                acc2 = _dot(x, w2, acc2, BLOCK_M, IEEE)

    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if SILU:
            acc2 = acc2 * tl.load(s_ptr + up_off + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if SILU:
        if HAS_BIAS:
            acc2 += tl.load(b_ptr + up_off + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        g = y.to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dtype) * acc2.to(dtype)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


# Launch configs (BLOCK_N, BLOCK_K, num_warps) by (rows computed, K): data files per device in gemv_configs/
# (default.json: the table, with where it comes from; <TAG>.json: entries that replace the one-row table's on a
# device whose name contains TAG). Last word: LLMC_GEMV_CONFIGS (`envs`), or a sweep's result (bench_gemv, then
# `one_row_table.cache_clear()`).
CONFIG_DIR = Path(__file__).with_name("gemv_configs")


def _table(entries: dict[str, list[int]]) -> dict[tuple[int, int], tuple[int, int, int]]:
    return {tuple(map(int, key.split(","))): tuple(v) for key, v in entries.items()}


_DEFAULT = json.loads((CONFIG_DIR / "default.json").read_text())
DEFAULT_CONFIG: tuple[int, int, int] = tuple(_DEFAULT["one_row_default"])
CONFIGS = _table(_DEFAULT["one_row"])
DEFAULT_CONFIG_DOT: tuple[int, int, int] = tuple(_DEFAULT["dot_default"])
CONFIGS_DOT = _table(_DEFAULT["dot"])
DEVICE_CONFIGS = {path.stem: _table(json.loads(path.read_text())["one_row"])
                  for path in sorted(CONFIG_DIR.glob("*.json")) if path.stem != "default"}
OVERRIDES: dict[tuple[int, int], tuple[int, int, int]] = {}
if SWITCHES.gemv_configs:
    OVERRIDES.update(_table(json.loads(Path(SWITCHES.gemv_configs).read_text())))


@functools.lru_cache(maxsize=None)
def one_row_table(device_name: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    table = dict(CONFIGS)
    for tag, entries in DEVICE_CONFIGS.items():
        if tag in device_name:
            table.update(entries)
    return table | OVERRIDES


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def config_for(m: int, n: int, k: int, device_name: str = "") -> tuple[int, int, int]:
    if m == 1:
        return one_row_table(device_name).get((n, k), DEFAULT_CONFIG)
    return CONFIGS_DOT.get((n, k), DEFAULT_CONFIG_DOT)


def _launch(x, residual, norm_weight, eps, weight, bias, silu, config, scale=None):
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1
    assert (scale is not None) == (weight.dtype != x.dtype), "quantised weights need their row scale"
    m, k = x.shape
    rows = weight.shape[0] // 2 if silu else weight.shape[0]
    assert weight.shape[1] == k and m <= 16
    out = torch.empty((m, rows), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
    bn, bk, warps = config or config_for(m, rows, k, _device_name(x.device.index))
    bm = 1 if m == 1 else 16
    if bm > 1 and x.dtype == torch.float32:
        bk = min(bk, 128)  # fp32 tl.dot tiles, pipelined, would overflow shared memory
    grid = (triton.cdiv(rows, bn),)
    _gemv_kernel[grid](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else x, out, res_out, scale if scale is not None else x,
        m, rows, k, x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), out.stride(0),
        res_out.stride(0), rows if silu else 0, eps,
        NORM=norm_weight is not None, HAS_RES=residual is not None, HAS_BIAS=bias is not None, SILU=silu,
        HAS_SCALE=scale is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, EVEN_N=rows % bn == 0,
        IEEE=x.dtype == torch.float32, ONE_PASS=k <= bk, num_warps=warps)
    return out, res_out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu: bool = False,
         config=None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (then silu_and_mul when `silu`) for x [M <= 16, K]; a quantised weight's rows are
    multiplied by `scale` [N] (float32)."""
    return _launch(x, None, None, 0.0, weight, bias, silu, config, scale)[0]


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu: bool = False, config=None,
                scale: torch.Tensor | None = None):
    """(linear(rms_norm(x + residual)), x + residual); without `residual`: (linear(rms_norm(x)), x)."""
    out, res_out = _launch(x, residual, norm_weight, eps, weight, bias, silu, config, scale)
    return out, res_out
