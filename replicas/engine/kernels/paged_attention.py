"""Paged attention on GPU (Triton): every packed query row of a step attends to its sequence's KV pages in
place, read through the block table (no gather), causally by absolute position. One kernel serves decodes,
prefill chunks and chunks over a cached prefix alike (see `replicas.engine.paged_metadata`).

Grid: (query blocks, KV heads, splits). A program holds `block_q` tokens x the query heads of one KV head as
the rows of its Q tile, streams K/V tiles of `TILE` positions (several pages) with an online softmax, and
writes its rows once. Padded rows (past the sequence's tokens, or the GQA group's tail) compute on zeros
and are never stored. When a step has too few programs to fill the GPU (batch-1 decode, a short chunk over
a long cached prefix), each program's key range is split `num_splits` ways (flash-decoding): the splits
write unnormalised partials and a second kernel merges them.

`store_kv` writes the step's K and V into their cache slots in one launch.

FP8 pools (`KV_FP8`, E4M3): `store_kv` writes K * (1 / k_scale) and V * (1 / v_scale), clamped to +-448 and
rounded to nearest even, as `replicas.engine.quant.ops.quantize_kv` does on CPU. The attention kernel converts each
K / V tile to the query dtype after loading it, folds k_scale into the softmax scale and multiplies the output (or
a split's partial sums, which the merge combines linearly) by v_scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replicas.engine.paged_metadata import PagedMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, qblock_seq_ptr,
        qblock_first_ptr, part_ptr, qk_scale, v_scale, softcap,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        QPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_Q: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, KV_FP8: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(qblock_seq_ptr + pid)
    q_first = tl.load(qblock_first_ptr + pid)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx = seq_len - q_len  # position of the sequence's first query token

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_first + offs_m // QPK
    head = kvh * QPK + offs_m % QPK
    row_ok = (offs_m < BLOCK_Q * QPK) & (tok < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    # Keys up to the block's last query token (causal); never past the context.
    kv_end = tl.minimum(seq_len, ctx + q_first + BLOCK_Q)
    # Sliding window: keys from the block's first query's window start; the pages before it are never read.
    if WINDOW > 0:
        kv_lo = tl.maximum(ctx + q_first - WINDOW + 1, 0)
    else:
        kv_lo = 0
    if NUM_SPLITS == 1:
        lo = kv_lo
        hi = kv_end
    else:  # whole tiles per split
        chunk = tl.cdiv(tl.cdiv(kv_end - kv_lo, NUM_SPLITS), TILE) * TILE
        lo = kv_lo + split * chunk
        hi = tl.minimum(kv_end, lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_t = tl.arange(0, TILE)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t0 in range(lo, hi, TILE):
        pos = t0 + offs_t
        t_ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=t_ok, other=0).to(tl.int64)
        in_page = pos % PAGE
        k_off = page * stride_kb + in_page * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=t_ok[None, :] & d_ok[:, None], other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)  # the scale is in qk_scale
        if IEEE:  # fp32 caches: no tf32 rounding
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale  # [BLOCK_M, TILE], log2 domain
        if SOFTCAP:  # softcap * tanh(scaled / softcap), back in the log2 domain; tanh(x) = 1 - 2 / (e^2x + 1)
            x = s / (1.4426950408889634 * softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634
        visible = (pos[None, :] <= q_pos[:, None]) & t_ok[None, :]
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = page * stride_vb + in_page * stride_vs + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if KV_FP8:
            v = v.to(q.dtype)  # the scale multiplies acc once, below
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if KV_FP8:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:  # partial [m | l | acc] rows of this split; a split with no visible key leaves m = -inf, l = 0
        base = part_ptr + (((pid * tl.num_programs(1) + kvh) * NUM_SPLITS + split).to(tl.int64)
                           * (BLOCK_M * (BLOCK_D + 2)))
        tl.store(base + offs_m, m_i)
        tl.store(base + BLOCK_M + offs_m, l_i)
        tl.store(base + 2 * BLOCK_M + offs_m[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _merge_splits_kernel(
        out_ptr, part_ptr, query_start_ptr, qblock_seq_ptr, qblock_first_ptr, stride_ot, stride_oh,
        QPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_Q: tl.constexpr, NUM_SPLITS: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(qblock_seq_ptr + pid)
    q_first = tl.load(qblock_first_ptr + pid)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    offs_m = tl.arange(0, BLOCK_M)
    tok = q_first + offs_m // QPK
    head = kvh * QPK + offs_m % QPK
    row_ok = (offs_m < BLOCK_Q * QPK) & (tok < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = (q_start + tok).to(tl.int64)
    base = part_ptr + ((pid * tl.num_programs(1) + kvh) * NUM_SPLITS).to(tl.int64) * (BLOCK_M * (BLOCK_D + 2))
    # m and l of all splits in one load; the unrolled acc loop keeps every split's load in flight at once.
    offs_s = tl.arange(0, NUM_SPLITS)
    ms = tl.load(base + offs_s[:, None] * (BLOCK_M * (BLOCK_D + 2)) + offs_m[None, :])
    ls = tl.load(base + offs_s[:, None] * (BLOCK_M * (BLOCK_D + 2)) + BLOCK_M + offs_m[None, :])
    m = tl.max(ms, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    ws = tl.exp2(ms - m[None, :])
    l_sum = tl.sum(ls * ws, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part = base + s * (BLOCK_M * (BLOCK_D + 2))
        w = tl.exp2(tl.load(part + offs_m) - m)
        acc += tl.load(part + 2 * BLOCK_M + offs_m[:, None] * BLOCK_D + offs_d[None, :]) * w[:, None]
    l_sum = tl.where(l_sum == 0.0, 1.0, l_sum)
    out = acc / l_sum[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt, k_inv, v_inv,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, KV_FP8: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=ok)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=ok)
    if KV_FP8:
        k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv, -448.0), 448.0).to(k_cache_ptr.dtype.element_ty)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv, -448.0), 448.0).to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=ok)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, KVH, D], each token's heads contiguous; caches [num_blocks, block_size, KVH, D], contiguous
    (float8_e4m3fn: quantised with the scales)."""
    row = k.shape[1] * k.shape[2]
    assert k.stride(1) == v.stride(1) == k.shape[2] and k.stride(2) == v.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), 1.0 / k_scale,
                                    1.0 / v_scale, ROW=row, BLOCK=triton.next_power_of_2(row),
                                    KV_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                    scale: float, out: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0, *, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q: [T, H, D] packed rows; caches [num_blocks, block_size, KVH, D] (the step's K/V already stored; an FP8
    cache's values are K / k_scale, V / v_scale). Returns [T, H, D]. `window`: a query at p sees keys
    (p - window, p]; `softcap`: scores capped by tanh."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    qpk = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = 64 if block_d <= 128 else 32
    splits = meta.num_splits
    assert splits & (splits - 1) == 0, "num_splits must be a power of two"
    grid = (meta.qblock_seq.shape[0], num_kv_heads, splits)
    part = out if splits == 1 else torch.empty(grid[0] * num_kv_heads * splits * meta.block_m * (block_d + 2),
                                               dtype=torch.float32, device=q.device)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start, meta.qblock_seq,
        meta.qblock_first, part, scale * _LOG2E * k_scale, v_scale, float(softcap or 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        QPK=qpk, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=meta.block_m, BLOCK_Q=meta.block_q,
        PAGE=k_cache.shape[1], TILE=tile, IEEE=q.dtype == torch.float32, NUM_SPLITS=splits,
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn, WINDOW=int(window), SOFTCAP=bool(softcap), num_warps=4,
        num_stages=2)
    if splits > 1:
        _merge_splits_kernel[grid[:2]](
            out, part, meta.query_start, meta.qblock_seq, meta.qblock_first, out.stride(0), out.stride(1),
            QPK=qpk, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=meta.block_m, BLOCK_Q=meta.block_q,
            NUM_SPLITS=splits, num_warps=4)
    return out
