"""The GPU attention kernel's step metadata (built on the host, so tested here on CPU): positions, slots,
context lengths and the query blocks of each program, plus a line-by-line torch emulation of the Triton
kernel's loop (tests/paged_kernel_emulation.py) checked against the CPU attention path."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.paged_metadata import build_step_tensors, choose_splits, query_heads_per_program
from tests.engine.paged_kernel_emulation import emulate_paged_attention


def _step(block_size: int, seed: int = 0):
    """3 decodes, a fresh prefill and a chunk over a cached prefix, on shuffled blocks of one pool."""
    g = torch.Generator().manual_seed(seed)
    # (start, tokens this step)
    shapes = [(5, 1), (17, 1), (0, 1), (0, 13), (21, 9)]
    perm = torch.randperm(64, generator=g).tolist()
    tables, used = [], 0
    for start, n in shapes:
        nb = -(-(start + n) // block_size)
        tables.append(perm[used:used + nb])
        used += nb
    return tables, [s for s, _ in shapes], [n for _, n in shapes]


@pytest.mark.parametrize("block_size", [4, 16])
def test_positions_slots_and_lengths_match_cpu_metadata(block_size):
    tables, starts, lengths = _step(block_size)
    pos, slots, meta = build_step_tensors(tables, starts, lengths, block_size, heads_per_kv=4, device="cpu")
    ref = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"))
    assert slots.tolist() == ref.slot_mapping.tolist()
    assert pos.tolist() == [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
    assert meta.seq_lens.tolist() == [s + n for s, n in zip(starts, lengths)]
    assert meta.query_start.tolist() == [0, 1, 2, 3, 16, 25]
    assert meta.block_tables.shape == (5, max(map(len, tables)))
    for i, bt in enumerate(tables):
        assert meta.block_tables[i, :len(bt)].tolist() == bt


@pytest.mark.parametrize("heads_per_kv,num_tokens,max_q,want", [
    (4, 1, 1, (16, 4)), (4, 600, 1, (16, 4)), (4, 600, 512, (64, 16)), (4, 40, 32, (16, 4)),
    (3, 40, 32, (16, 5)), (32, 1, 1, (32, 1)), (1, 2048, 2048, (64, 64))])
def test_query_block_shape(heads_per_kv, num_tokens, max_q, want):
    assert query_heads_per_program(heads_per_kv, num_tokens, max_q) == want


@pytest.mark.parametrize("heads_per_kv", [1, 3, 4])
def test_every_query_token_in_exactly_one_program(heads_per_kv):
    tables, starts, lengths = _step(4)
    _, _, meta = build_step_tensors(tables, starts, lengths, 4, heads_per_kv, device="cpu")
    covered = []
    for seq, first in zip(meta.qblock_seq.tolist(), meta.qblock_first.tolist()):
        covered += [(seq, t) for t in range(first, min(first + meta.block_q, lengths[seq]))]
    assert sorted(covered) == [(i, t) for i, n in enumerate(lengths) for t in range(n)]


@pytest.mark.parametrize("programs,max_kv,sms,want", [
    (8, None, 132, 16), (8, 200, 132, 1), (8, 700, 132, 2), (64, 4128, 132, 8), (256, 4128, 132, 1),
    (8, 4128, 0, 1)])
def test_split_count(programs, max_kv, sms, want):
    assert choose_splits(programs, max_kv, sms) == want


@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(8, 2, 16, 4), (9, 3, 32, 16), (4, 4, 16, 8)])
def test_kernel_emulation_matches_cpu_attention(heads, kv_heads, head_dim, block_size, splits):
    torch.manual_seed(0)
    tables, starts, lengths = _step(block_size, seed=heads)
    t = sum(lengths)
    k_cache = torch.randn(64, block_size, kv_heads, head_dim, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(t, heads, head_dim, dtype=torch.float64)
    k = torch.randn(t, kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn_like(k)
    scale = head_dim ** -0.5
    ref_meta = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"))
    ref = paged_attention(q, k, v, k_cache, v_cache, ref_meta, scale)  # also stores k/v into the caches
    _, _, meta = build_step_tensors(tables, starts, lengths, block_size, heads // kv_heads, device="cpu")
    meta.num_splits = splits  # with 16 splits of whole 8-key tiles, some splits see no key at all
    out = emulate_paged_attention(q, k_cache, v_cache, meta, scale, tile=8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window,softcap", [(6, 0.0), (3, 0.0), (0, 5.0), (5, 2.0)])
def test_kernel_emulation_window_and_softcap_match_cpu_attention(window, softcap, splits):
    """Sliding window (decodes, a fresh prefill longer than the window, a chunk over a cached prefix) and
    soft-capping: the kernel's loop bounds and masks against the CPU path's windowed gather."""
    heads, kv_heads, head_dim, block_size = 8, 2, 16, 4
    torch.manual_seed(1)
    tables, starts, lengths = _step(block_size, seed=3)
    t = sum(lengths)
    k_cache = torch.randn(64, block_size, kv_heads, head_dim, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(t, heads, head_dim, dtype=torch.float64) * 3
    k = torch.randn(t, kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn_like(k)
    scale = head_dim ** -0.5
    ref_meta = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"), windows=(0, window))
    ref = paged_attention(q, k, v, k_cache, v_cache, ref_meta, scale, window=window, softcap=softcap)
    full = paged_attention(q, k, v, k_cache, v_cache, ref_meta, scale)
    assert not torch.allclose(ref, full)  # the window or the cap changes every sequence longer than it
    _, _, meta = build_step_tensors(tables, starts, lengths, block_size, heads // kv_heads, device="cpu")
    meta.num_splits = splits
    out = emulate_paged_attention(q, k_cache, v_cache, meta, scale, tile=8, window=window, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_windowed_attention_equals_masked_dense_attention():
    """The CPU path's window against a dense causal + window mask computed from scratch."""
    torch.manual_seed(2)
    window, block_size, heads, kv_heads, d = 5, 4, 4, 2, 8
    tables, starts, lengths = _step(block_size, seed=5)
    t = sum(lengths)
    k_cache = torch.randn(64, block_size, kv_heads, d, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(t, heads, d, dtype=torch.float64)
    k = torch.randn(t, kv_heads, d, dtype=torch.float64)
    v = torch.randn_like(k)
    meta = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"), windows=(window,))
    out = paged_attention(q, k, v, k_cache, v_cache, meta, d ** -0.5, window=window)
    row = 0
    for bt, start, n in zip(tables, starts, lengths):
        pos = torch.arange(start + n)
        slots = torch.tensor(bt)[pos // block_size] * block_size + pos % block_size
        ks = k_cache.view(-1, kv_heads, d)[slots].repeat_interleave(heads // kv_heads, 1)
        vs = v_cache.view(-1, kv_heads, d)[slots].repeat_interleave(heads // kv_heads, 1)
        for j in range(n):
            p = start + j
            s = torch.einsum("hd,khd->hk", q[row + j], ks) * d ** -0.5
            s[:, (pos > p) | (pos <= p - window)] = float("-inf")
            ref = torch.einsum("hk,khd->hd", s.softmax(-1), vs)
            torch.testing.assert_close(out[row + j], ref)
        row += n
