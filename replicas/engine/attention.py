"""Attention over the paged KV cache: per-step metadata and the one attention function every layer calls.

The batch is packed as [decode tokens (one per sequence) | prefill chunks]. K/V of every scheduled token
are written into their cache slots first, then attention reads the cache, so a chunk attends to its cached
prefix (including blocks another sequence of the same step just wrote). This CPU path gathers each
sequence's pages and calls SDPA; on GPU, `paged` metadata routes attention to the Triton kernel that reads
the pages in place (`replicas.engine.kernels.paged_attention`).

An FP8 pool (`engine.kv_cache_dtype: fp8`) holds K / scale and V / scale in E4M3, per-layer scales; every read
converts back. A fresh prefill chunk attends to its own K/V rounded the same way, so all tokens see the same
keys whichever path reads them, as in the GPU kernel, which reads everything from the pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from replicas.engine.paged_metadata import PagedMetadata
from replicas.engine.quant.ops import FP8, dequantize_kv, quantize_kv


@dataclass
class PrefillSpan:
    start: int  # first row of this chunk in the packed batch
    end: int
    # Cache slots of the whole context [0, context_len) and the causal mask of the chunk against it;
    # None when the chunk is the whole context (no cached prefix): attend to the fresh k/v directly.
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every packed token
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [D, L] slots of each decoding sequence's context (padded)
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, L] True where the slot is part of the context
    prefills: list[PrefillSpan] = field(default_factory=list)
    paged: PagedMetadata | None = None  # GPU: the Triton kernel's metadata; the fields above stay unused
    # CPU: sliding window (tokens) -> the same step's metadata reading only each query's window
    windowed: dict[int, "AttentionMetadata"] = field(default_factory=dict)

    @classmethod
    def build(cls, block_tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
              device: torch.device, windows=(0,)) -> "AttentionMetadata":
        """Sequences given decodes first: row i computes tokens [starts[i], starts[i]+lengths[i]). `windows`:
        the attention windows of the model's layers (0: full attention); the full-attention metadata is the
        one returned, each sliding window's in its `windowed`."""
        metas = {w: cls._build(block_tables, starts, lengths, block_size, device, w) for w in windows}
        meta = metas.get(0) or next(iter(metas.values()))
        meta.windowed = {w: m for w, m in metas.items() if w}
        return meta

    @classmethod
    def _build(cls, block_tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
               device: torch.device, window: int) -> "AttentionMetadata":
        """With a window, a query at position p reads keys (p - window, p] only: the pages before its window
        are never gathered (they may be freed)."""
        num_decodes = 0
        while num_decodes < len(lengths) and lengths[num_decodes] == 1:
            num_decodes += 1
        slots, prefills = [], []
        row = num_decodes
        decode_slots = decode_mask = None
        if num_decodes:
            ctx = torch.tensor([s + 1 for s in starts[:num_decodes]])
            width = max(len(bt) for bt in block_tables[:num_decodes])
            table = torch.zeros(num_decodes, width, dtype=torch.long)  # padding points at block 0, masked off
            for i, bt in enumerate(block_tables[:num_decodes]):
                table[i, :len(bt)] = torch.tensor(bt)
            lo = (ctx - window).clamp(min=0) if window else torch.zeros_like(ctx)
            pos = lo.unsqueeze(1) + torch.arange(int((ctx - lo).max()))
            valid = pos < ctx.unsqueeze(1)
            pos = torch.where(valid, pos, (ctx - 1).unsqueeze(1))  # padding reads the last key, masked off
            decode_slots = table.gather(1, pos // block_size) * block_size + pos % block_size
            decode_mask = valid.view(num_decodes, 1, 1, -1)
            slots.append(decode_slots.gather(1, (ctx - 1 - lo).unsqueeze(1)).squeeze(1))
        for bt, start, n in zip(block_tables[num_decodes:], starts[num_decodes:], lengths[num_decodes:]):
            lo = max(0, start - window + 1) if window else 0
            pos = torch.arange(lo, start + n)
            ctx_slots = torch.tensor(bt)[pos // block_size] * block_size + pos % block_size
            slots.append(ctx_slots[start - lo:])
            span = PrefillSpan(row, row + n)
            if start or (window and n > window):
                span.context_slots = ctx_slots.to(device)
                q_pos = torch.arange(start, start + n).unsqueeze(1)
                mask = pos.unsqueeze(0) <= q_pos
                if window:
                    mask &= pos.unsqueeze(0) > q_pos - window
                span.mask = mask.to(device)
            prefills.append(span)
            row += n
        return cls(slot_mapping=torch.cat(slots).to(device), num_decodes=num_decodes,
                   decode_slots=None if decode_slots is None else decode_slots.to(device),
                   decode_mask=None if decode_mask is None else decode_mask.to(device), prefills=prefills)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, KVH, D] into caches shaped [num_blocks, block_size, KVH, D] (an FP8 cache: divided by the scales,
    through byte views: index_copy_ has no float8 kernel)."""
    if k_cache.dtype == FP8:
        k, v = quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


class _Rows:
    """index_select over a cache's token rows, in the compute dtype (an FP8 cache converted with its scale)."""

    def __init__(self, cache: torch.Tensor, row_shape: torch.Size, scale: float, dtype: torch.dtype):
        self.fp8 = cache.dtype == FP8
        self.rows = (cache.view(torch.uint8) if self.fp8 else cache).view(-1, *row_shape)
        self.scale, self.dtype = scale, dtype

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        x = self.rows.index_select(dim, index)
        return dequantize_kv(x.view(FP8), self.scale, self.dtype) if self.fp8 else x


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0, *, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] of the packed batch. Returns [T, H, D]. k_scale, v_scale: an FP8 cache's.
    `window`: sliding-window attention (a query at p sees keys (p - window, p]); `softcap`: scores become
    softcap * tanh(s / softcap)."""
    if meta.paged is not None:
        from replicas.engine.kernels import paged_attention as gpu
        gpu.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        return gpu.paged_attention(q, k_cache, v_cache, meta.paged, scale, k_scale=k_scale, v_scale=v_scale,
                                   window=window, softcap=softcap)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    if window:
        meta = meta.windowed[window]
    if k_cache.dtype == FP8:  # fresh chunks attend to their K/V as the cache holds them
        k = dequantize_kv(quantize_kv(k, k_scale), k_scale, q.dtype)
        v = dequantize_kv(quantize_kv(v, v_scale), v_scale, q.dtype)
    kf, vf = _Rows(k_cache, k.shape[1:], k_scale, q.dtype), _Rows(v_cache, v.shape[1:], v_scale, q.dtype)
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        # Gathers use index_select, which copies whole [KVH, Dh] rows: advanced indexing (kf[slots]) goes
        # element by element and cost more than the attention itself (5x slower at 32 x 70 slots).
        # [D*L, KVH, Dh] -> [D, KVH, L, Dh]
        shape = (d, meta.decode_slots.shape[1], *k.shape[1:])
        kc = kf.index_select(0, meta.decode_slots.view(-1)).view(shape).transpose(1, 2)
        vc = vf.index_select(0, meta.decode_slots.view(-1)).view(shape).transpose(1, 2)
        o = _sdpa(q[:d].unsqueeze(2), kc, vc, meta.decode_mask, scale, softcap)
        out[:d] = o.squeeze(2)
    # Prefill chunks as batches of one, [1, H, n, Dh]: SDPA runs 3-D inputs through its unfused math path on
    # CPU, 2-4x slower than the flash kernel it picks for 4-D ones (and quadratic in memory).
    for span in meta.prefills:
        qs = q[span.start:span.end].unsqueeze(0).transpose(1, 2)
        if span.context_slots is None:
            ks = k[span.start:span.end].unsqueeze(0).transpose(1, 2)
            vs = v[span.start:span.end].unsqueeze(0).transpose(1, 2)
            o = _sdpa(qs, ks, vs, None, scale, softcap)
        else:
            ks = kf.index_select(0, span.context_slots).unsqueeze(0).transpose(1, 2)
            vs = vf.index_select(0, span.context_slots).unsqueeze(0).transpose(1, 2)
            o = _sdpa(qs, ks, vs, span.mask, scale, softcap)
        out[span.start:span.end] = o[0].transpose(0, 1)
    return out


def _sdpa(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """SDPA (causal where `mask` is None); with soft-capping, which SDPA lacks, the same in plain ops
    (transformers' eager Gemma 2 attention: cap the scaled scores, mask, softmax in fp32)."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is None:
        lq, lk = s.shape[-2], s.shape[-1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype) @ v
