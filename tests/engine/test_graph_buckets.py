"""CUDA-graph buckets' padded inputs (built on the host, so tested here on CPU): a step copied into a larger
bucket gives the same attention for its rows as the unpadded eager metadata (through the torch emulation of
the Triton kernel), padding rows write only the spare slot, padding programs store nothing."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.cuda_graphs import Bucket, batch_buckets, bucket_shape, mixed_buckets
from replicas.engine.paged_metadata import query_heads_per_program
from tests.engine.paged_kernel_emulation import emulate_paged_attention

BLOCK = 4
NUM_BLOCKS = 40  # block 40 is the spare block: slots 160..163
PAD_SLOT = NUM_BLOCKS * BLOCK


def _bucket(decode, tokens, seqs, heads_per_kv, splits, max_blocks=12):
    block_m, block_q = query_heads_per_program(heads_per_kv, tokens, 1 if decode else tokens)
    programs = tokens if decode else -(-tokens // block_q) + seqs
    tables = torch.full((seqs + 1, max_blocks), 7, dtype=torch.int32)  # stale rows point at a used block
    return Bucket(decode=decode, tokens=tokens, seqs=seqs, programs=programs, block_m=block_m, block_q=block_q,
                  splits=splits, block_tables=tables, pad_slot=PAD_SLOT, device=torch.device("cpu"))


def _tables(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables, used = [], 0
    for start, n in shapes:
        nb = -(-(start + n) // BLOCK)
        tables.append(perm[used:used + nb])
        used += nb
    return tables


def _check(bucket, shapes, heads, kv_heads, seed):
    """Fill `bucket` with the step, run the emulated kernel over it, compare with the CPU attention path."""
    torch.manual_seed(seed)
    tables = _tables(shapes, seed)
    starts, lengths = [s for s, _ in shapes], [n for _, n in shapes]
    t = sum(lengths)
    tokens = torch.randint(0, 100, (t,)).tolist()
    sample_rows, row = [], 0
    for n in lengths:
        row += n
        sample_rows.append(row - 1)
    bucket.fill(tokens, starts, lengths, tables, sample_rows, BLOCK)
    k_cache = torch.randn(NUM_BLOCKS + 1, BLOCK, kv_heads, 8, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(bucket.tokens, heads, 8, dtype=torch.float64)
    k = torch.randn(bucket.tokens, kv_heads, 8, dtype=torch.float64)
    v = torch.randn_like(k)
    ref_meta = AttentionMetadata.build(tables, starts, lengths, BLOCK, torch.device("cpu"))
    ref = paged_attention(q[:t], k[:t], v[:t], k_cache, v_cache, ref_meta, 0.3)  # stores the real rows' k/v
    assert bucket.input_ids[:t].tolist() == tokens and bucket.input_ids[t:].eq(0).all()
    assert bucket.slots[:t].tolist() == ref_meta.slot_mapping.tolist()
    assert bucket.slots[t:].eq(PAD_SLOT).all()  # padding rows write only the spare block
    assert bucket.positions[:t].tolist() == [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
    out = emulate_paged_attention(q, k_cache, v_cache, bucket.meta.paged, 0.3, tile=8)
    torch.testing.assert_close(out[:t], ref, rtol=1e-9, atol=1e-9)
    return out, t, sample_rows


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 3)])
def test_mixed_bucket_padding(heads, kv_heads, splits):
    # A short chunk over a cached prefix, a decode, a fresh prefill: 14 tokens in a 32-token bucket.
    shapes = [(37, 1), (41, 6), (0, 7)]
    bucket = _bucket(False, 32, 32, heads // kv_heads, splits)
    out, t, sample_rows = _check(bucket, shapes, heads, kv_heads, seed=heads + splits)
    assert out[t:].isnan().all()  # padding rows belong to no sequence: nothing stored for them
    assert bucket.sample_rows[:len(sample_rows)].tolist() == sample_rows
    # Refilled with a different, smaller step: no stale metadata of the first one leaks in.
    _check(bucket, [(10, 3)], heads, kv_heads, seed=1)


@pytest.mark.parametrize("splits", [1, 8])
def test_decode_bucket_padding(splits):
    bucket = _bucket(True, 8, 8, 4, splits)
    out, t, _ = _check(bucket, [(13, 1), (2, 1), (30, 1)], 8, 2, seed=splits)
    assert not out[t:].isnan().any()  # padding rows are one-token sequences over the spare slot
    assert bucket.meta.paged.seq_lens[t:].eq(1).all()


def test_bucket_sizes():
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert mixed_buckets(8192) == [16, 32, 64, 128, 256]
    assert mixed_buckets(48) == [16, 32, 48]


def test_bucket_key_range_splits():
    """H200 (132 SMs), Llama-3-8B (8 KV heads, 4 query heads each): decode programs are one per sequence, so
    batch 32 (256 programs) fills the GPU without splits; batch 1 splits 16 ways, or not at all over contexts
    of <= 256 keys; a 32-token mixed step has 8 query blocks per KV head -> 8 splits."""
    kw = dict(max_batch=256, heads_per_kv=4, num_kv_heads=8, num_sms=132)
    assert bucket_shape(True, 32, **kw)["splits"] == 1
    assert bucket_shape(True, 1, **kw)["splits"] == 16
    assert bucket_shape(True, 1, max_kv_len=256, **kw)["splits"] == 1
    mixed = bucket_shape(False, 32, **kw)
    assert (mixed["splits"], mixed["programs"], mixed["seqs"]) == (8, 8 + 32, 32)
