"""Per-step inputs of the GPU attention kernel, built on the host in one pass: which query rows each
kernel program owns, each sequence's context length and block table. No Triton here (CPU-testable).

The packed batch holds each sequence's tokens of this step contiguously (decodes first). A kernel program
covers `block_q` consecutive query tokens of one sequence for one KV head (all query heads of that KV head
at once, so K/V are read once per group), and attends to context positions [0, position of its last token].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedMetadata:
    block_tables: torch.Tensor  # int32 [B, W]; entries past a sequence's blocks are never read
    seq_lens: torch.Tensor  # int64 [B]: context length after this step (cached prefix + this step's tokens)
    query_start: torch.Tensor  # int32 [B+1]: first packed row of each sequence
    qblock_seq: torch.Tensor  # int32 [G]: sequence of each program
    qblock_first: torch.Tensor  # int32 [G]: its first query token, counted within the sequence's step tokens
    block_m: int  # query rows per program (tokens x query heads per KV head), a power of two >= 16
    block_q: int  # tokens per program = block_m // heads per KV head


def query_heads_per_program(heads_per_kv: int, num_tokens: int, max_query_len: int) -> tuple[int, int]:
    """(block_m, block_q). Decodes and small steps (short chunks over a long cached prefix) take the 16-row
    minimum of a tensor-core dot, for more programs in flight; large prefills take 64 rows, so each program
    reuses a K/V tile for more queries."""
    block_m = 64 if num_tokens >= 512 and max_query_len > 1 else 16
    block_m = max(block_m, 1 << (heads_per_kv - 1).bit_length())
    return block_m, block_m // heads_per_kv


def build_step_tensors(block_tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
                       heads_per_kv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
    """Positions [T] and slot mapping [T] (int64), and the kernel metadata of one step, moved to `device` in
    two host-to-device copies."""
    block_m, block_q = query_heads_per_program(heads_per_kv, sum(lengths), max(lengths))
    positions, slots, seq_lens, qstart, qseq, qfirst = [], [], [], [0], [], []
    for i, (bt, start, n) in enumerate(zip(block_tables, starts, lengths)):
        end = start + n
        positions.extend(range(start, end))
        pos = start
        while pos < end:  # slots block by block
            b, off = divmod(pos, block_size)
            upto = min(end, (b + 1) * block_size)
            base = bt[b] * block_size
            slots.extend(range(base + off, base + off + upto - pos))
            pos = upto
        seq_lens.append(end)
        qstart.append(qstart[-1] + n)
        for first in range(0, n, block_q):
            qseq.append(i)
            qfirst.append(first)
    t = len(positions)
    longs = torch.tensor(positions + slots + seq_lens, dtype=torch.long).to(device, non_blocking=True)
    width = max(map(len, block_tables))
    b = len(block_tables)
    flat = [x for bt in block_tables for x in (bt + [0] * (width - len(bt)))]
    ints = torch.tensor(qstart + qseq + qfirst + flat, dtype=torch.int32).to(device, non_blocking=True)
    g = len(qseq)
    o = 0
    qstart_t, o = ints[o:o + b + 1], o + b + 1
    qseq_t, o = ints[o:o + g], o + g
    qfirst_t, o = ints[o:o + g], o + g
    meta = PagedMetadata(block_tables=ints[o:].view(b, width), seq_lens=longs[2 * t:], query_start=qstart_t,
                         qblock_seq=qseq_t, qblock_first=qfirst_t, block_m=block_m, block_q=block_q)
    return longs[:t], longs[t:2 * t], meta
