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
    num_splits: int = 1  # key-range splits per program (flash-decoding), merged by a second kernel


def choose_splits(num_programs: int, max_kv_len: int | None, num_sms: int) -> int:
    """Split each program's key range until the grid holds ~4 programs per SM, keeping >= 256 keys per
    split (`max_kv_len` None: unknown at CUDA-graph capture, so split for the longest). A power of two, so
    few kernel variants get compiled."""
    if num_sms <= 0 or num_programs >= num_sms:
        return 1
    splits = min(16, -(-4 * num_sms // num_programs))
    if max_kv_len is not None:
        splits = min(splits, -(-max_kv_len // 256))
    return 1 << (max(1, splits).bit_length() - 1)


def query_heads_per_program(heads_per_kv: int, num_tokens: int, max_query_len: int) -> tuple[int, int]:
    """(block_m, block_q). Decodes and small steps (short chunks over a long cached prefix) take the 16-row
    minimum of a tensor-core dot, for more programs in flight; large prefills take 64 rows, so each program
    reuses a K/V tile for more queries."""
    block_m = 64 if num_tokens >= 512 and max_query_len > 1 else 16
    block_m = max(block_m, 1 << (heads_per_kv - 1).bit_length())
    return block_m, block_m // heads_per_kv


@dataclass
class StepLists:
    """One step's kernel inputs as host lists (see `step_lists`)."""
    positions: list[int]  # [T] absolute position of every packed token
    slots: list[int]  # [T] its cache slot
    seq_lens: list[int]  # [B]
    query_start: list[int]  # [B+1]
    qblock_seq: list[int]  # [G]
    qblock_first: list[int]  # [G]


def step_lists(block_tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
               block_q: int) -> StepLists:
    """The eager path packs these into tensors (`build_step_tensors`); CUDA graphs copy them into their
    padded persistent buffers (`replicas.engine.cuda_graphs`)."""
    out = StepLists([], [], [], [0], [], [])
    for i, (bt, start, n) in enumerate(zip(block_tables, starts, lengths)):
        end = start + n
        out.positions.extend(range(start, end))
        pos = start
        while pos < end:  # slots block by block
            b, off = divmod(pos, block_size)
            upto = min(end, (b + 1) * block_size)
            base = bt[b] * block_size
            out.slots.extend(range(base + off, base + off + upto - pos))
            pos = upto
        out.seq_lens.append(end)
        out.query_start.append(out.query_start[-1] + n)
        for first in range(0, n, block_q):
            out.qblock_seq.append(i)
            out.qblock_first.append(first)
    return out


def build_step_tensors(block_tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
                       heads_per_kv: int, device: torch.device, num_kv_heads: int = 1,
                       num_sms: int = 0) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
    """Positions [T] and slot mapping [T] (int64), and the kernel metadata of one step, moved to `device` in
    two host-to-device copies. `num_sms` > 0 lets programs split their key range (see `choose_splits`)."""
    block_m, block_q = query_heads_per_program(heads_per_kv, sum(lengths), max(lengths))
    lists = step_lists(block_tables, starts, lengths, block_size, block_q)
    positions, slots, seq_lens = lists.positions, lists.slots, lists.seq_lens
    qstart, qseq, qfirst = lists.query_start, lists.qblock_seq, lists.qblock_first
    # Each array starts 16-byte aligned in its packed buffer: Triton specialises kernels on pointer alignment,
    # so unaligned slices would compile a new variant mid-serving.
    t, tp = len(positions), _round_up(len(positions), 2)
    longs = torch.tensor(_padded(positions, tp) + _padded(slots, tp) + seq_lens, dtype=torch.long).to(
        device, non_blocking=True)
    width = max(map(len, block_tables))
    b = len(block_tables)
    g = len(qseq)
    flat = [x for bt in block_tables for x in (bt + [0] * (width - len(bt)))]
    ints = torch.tensor(_padded(qstart, _round_up(b + 1, 4)) + _padded(qseq, _round_up(g, 4)) +
                        _padded(qfirst, _round_up(g, 4)) + flat, dtype=torch.int32).to(device, non_blocking=True)
    o = 0
    qstart_t, o = ints[o:o + b + 1], o + _round_up(b + 1, 4)
    qseq_t, o = ints[o:o + g], o + _round_up(g, 4)
    qfirst_t, o = ints[o:o + g], o + _round_up(g, 4)
    meta = PagedMetadata(block_tables=ints[o:].view(b, width), seq_lens=longs[2 * tp:], query_start=qstart_t,
                         qblock_seq=qseq_t, qblock_first=qfirst_t, block_m=block_m, block_q=block_q,
                         num_splits=choose_splits(g * num_kv_heads, max(seq_lens), num_sms))
    return longs[:t], longs[tp:tp + t], meta


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _padded(values: list[int], n: int) -> list[int]:
    return values + [0] * (n - len(values))
