"""A line-by-line torch emulation of the Triton paged-attention kernel (replicas/engine/kernels/
paged_attention.py), program by program and tile by tile, so its index arithmetic (query blocks, GQA rows,
page lookup, causal bound, online softmax) is tested on CPU, where Triton does not run. Keep in step
with the kernel."""
from __future__ import annotations

import math

import torch

from replicas.engine.paged_metadata import PagedMetadata


def emulate_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata,
                            scale: float, tile: int = 64, k_scale: float = 1.0, v_scale: float = 1.0,
                            window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """An FP8 cache (float8_e4m3fn) as the kernel reads it: tiles converted to q's dtype, k_scale folded into the
    softmax scale, the output times v_scale. `window`, `softcap`: the kernel's sliding window and soft-capping."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        k_cache, v_cache = k_cache.to(q.dtype), v_cache.to(q.dtype)
    else:
        k_scale = v_scale = 1.0
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    qpk = num_heads // num_kv_heads
    block_m, block_q = meta.block_m, meta.block_q
    out = torch.full_like(q, float("nan"))
    qk_scale = scale * 1.4426950408889634 * k_scale
    for pid in range(meta.qblock_seq.shape[0]):
        for kvh in range(num_kv_heads):
            seq = int(meta.qblock_seq[pid])
            q_first = int(meta.qblock_first[pid])
            q_start = int(meta.query_start[seq])
            q_len = int(meta.query_start[seq + 1]) - q_start
            seq_len = int(meta.seq_lens[seq])
            ctx = seq_len - q_len
            offs_m = torch.arange(block_m)
            tok = q_first + offs_m // qpk
            head = kvh * qpk + offs_m % qpk
            row_ok = (offs_m < block_q * qpk) & (tok < q_len)
            rows = q_start + tok
            qt = torch.zeros(block_m, head_dim, dtype=q.dtype)
            qt[row_ok] = q[rows[row_ok], head[row_ok]]
            q_pos = ctx + tok
            kv_end = min(seq_len, ctx + q_first + block_q)
            kv_lo = max(ctx + q_first - window + 1, 0) if window else 0
            parts = [_split(qt, q_pos, k_cache, v_cache, meta.block_tables[seq], kvh, lo, hi, tile, qk_scale,
                            window, softcap)
                     for lo, hi in _split_ranges(kv_lo, kv_end, meta.num_splits, tile)]
            # The merge kernel (a single split merges to itself).
            m = torch.stack([p[0] for p in parts]).max(0).values
            m = torch.where(m == -math.inf, 0.0, m)
            l_sum = sum(p[1] * torch.exp2(p[0] - m) for p in parts)
            acc = sum(p[2] * v_scale * torch.exp2(p[0] - m)[:, None] for p in parts)
            l_sum = torch.where(l_sum == 0.0, 1.0, l_sum)
            res = acc / l_sum[:, None]
            out[rows[row_ok], head[row_ok]] = res[row_ok]
    return out


def _split_ranges(kv_lo: int, kv_end: int, splits: int, tile: int) -> list[tuple[int, int]]:
    if splits == 1:
        return [(kv_lo, kv_end)]
    per_split = -(-(kv_end - kv_lo) // splits)
    chunk = -(-per_split // tile) * tile  # whole tiles per split
    return [(kv_lo + s * chunk, min(kv_end, kv_lo + s * chunk + chunk)) for s in range(splits)]


def _split(qt, q_pos, k_cache, v_cache, table, kvh, lo, hi, tile, qk_scale, window=0, softcap=0.0):
    page = k_cache.shape[1]
    block_m, head_dim = qt.shape
    m_i = torch.full((block_m,), -math.inf, dtype=qt.dtype)
    l_i = torch.zeros(block_m, dtype=qt.dtype)
    acc = torch.zeros(block_m, head_dim, dtype=qt.dtype)
    for t0 in range(lo, hi, tile):
        pos = t0 + torch.arange(tile)
        t_ok = pos < hi
        pages = torch.where(t_ok, table[torch.where(t_ok, pos // page, 0)], 0).long()
        in_page = pos % page
        k = torch.where(t_ok[:, None], k_cache[pages, in_page, kvh], 0.0)  # [TILE, D]
        s = (qt @ k.T) * qk_scale
        if softcap:
            x = s / (1.4426950408889634 * softcap)
            s = softcap * (1.0 - 2.0 / (torch.exp(2.0 * x) + 1.0)) * 1.4426950408889634
        visible = (pos[None, :] <= q_pos[:, None]) & t_ok[None, :]
        if window:
            visible &= pos[None, :] > q_pos[:, None] - window
        s = torch.where(visible, s, -math.inf)
        m_new = torch.maximum(m_i, s.max(1).values)
        m_use = torch.where(m_new == -math.inf, 0.0, m_new)
        p = torch.exp2(s - m_use[:, None])
        alpha = torch.exp2(m_i - m_use)
        l_i = l_i * alpha + p.sum(1)
        v = torch.where(t_ok[:, None], v_cache[pages, in_page, kvh], 0.0)
        acc = acc * alpha[:, None] + p @ v
        m_i = m_new
    return m_i, l_i, acc
