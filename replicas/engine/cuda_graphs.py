"""Steps replayed from CUDA graphs, captured once at start-up over persistent input buffers, so a step is two
or three small host-to-device copies and one replay instead of ~300 kernel launches from Python.

Two kinds of bucket:
- decode buckets, by batch size (one token per sequence, every sequence samples); small batches whose
  contexts are all short (< SHORT_CONTEXT) have a second graph with fewer key-range splits;
- mixed buckets, by token count up to `MAX_MIXED_TOKENS`: any small step (a short chunk over a long cached
  prefix, prefill chunks beside decodes), whose host launch overhead would otherwise exceed its GPU time.
Larger steps (big prefill chunks, GPU-bound anyway) run eagerly.

Padding: a bucket larger than the step runs padding rows (token 0 at position 0) that write their K/V into
the pool's spare block (`pad_slot`, never handed out); their outputs are dropped. In decode buckets each
padding row is a one-token sequence attending to one position (so the query metadata is constant); in mixed
buckets padding rows belong to no sequence, and padding kernel programs point at an empty sequence (no query
rows, no keys), so they store nothing.
"""
from __future__ import annotations

import torch

from replicas.engine.attention import AttentionMetadata
from replicas.engine.paged_metadata import (
    PagedMetadata,
    _round_up,
    choose_splits,
    query_heads_per_program,
    step_lists,
)

# Above this many tokens a step's GPU time dwarfs its launch overhead, and its activations would grow the
# graphs' memory pool.
MAX_MIXED_TOKENS = 256
# Decode contexts up to this many keys (positions) take a second set of small-batch graphs with fewer splits.
SHORT_CONTEXT = 256  # one split: no partials, no merge kernel


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch})


def mixed_buckets(max_tokens: int) -> list[int]:
    top = min(max_tokens, MAX_MIXED_TOKENS)
    return sorted({t for t in (16, 32, 64, 128, 256) if t < top} | {top})


class Bucket:
    """One graph's persistent inputs, on `device`: int64 [ids | positions | slots | seq_lens | sample rows] and
    int32 [query_start | qblock_seq | qblock_first] (each segment 16-byte aligned), and views of them as the
    model's inputs. `fill` copies a step in (CPU-testable; the graph itself is captured by StepGraphs)."""

    def __init__(self, *, decode: bool, tokens: int, seqs: int, programs: int, block_m: int, block_q: int,
                 splits: int, block_tables: torch.Tensor, pad_slot: int, device: torch.device):
        self.decode, self.tokens, self.seqs, self.programs = decode, tokens, seqs, programs
        self.pad_slot = pad_slot
        rows = 0 if decode else seqs  # decode buckets sample every row: no row index needed
        self._long_sizes = [tokens, tokens, tokens, seqs + 1, rows]
        self._int_sizes = [seqs + 2, programs, programs]
        self.longs = torch.zeros(sum(_round_up(n, 2) for n in self._long_sizes), dtype=torch.long, device=device)
        self.ints = torch.zeros(sum(_round_up(n, 4) for n in self._int_sizes), dtype=torch.int32, device=device)
        ids, pos, self.slots, seq_lens, self.sample_rows = _views(self.longs, self._long_sizes, 2)
        qstart, qseq, qfirst = _views(self.ints, self._int_sizes, 4)
        self.input_ids, self.positions = ids, pos
        self.meta = AttentionMetadata(slot_mapping=self.slots, paged=PagedMetadata(
            block_tables=block_tables[:seqs + 1], seq_lens=seq_lens, query_start=qstart, qblock_seq=qseq,
            qblock_first=qfirst, block_m=block_m, block_q=block_q, num_splits=splits))
        self.block_tables = block_tables
        self.slots.fill_(pad_slot)
        if decode:  # padding rows are one-token sequences: the query metadata never changes
            qstart.copy_(torch.arange(seqs + 2, dtype=torch.int32))
            qseq.copy_(torch.arange(programs, dtype=torch.int32))
            seq_lens.fill_(1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def fill(self, token_ids: list[int], starts: list[int], lengths: list[int], block_tables: list[list[int]],
             sample_rows: list[int], block_size: int, rope_shift: list[int] = ()) -> None:
        """Copy one step (sequences packed in order, fitting this bucket) into the persistent buffers.
        `rope_shift`: per sequence, added to its rotary positions (longrope's long table)."""
        b, t, size = len(starts), len(token_ids), block_size
        if self.decode:
            slots = [bt[p // size] * size + p % size for bt, p in zip(block_tables, starts)]
            positions = [p + s for p, s in zip(starts, rope_shift)] if any(rope_shift) else starts
            segments = [(token_ids, 0), (positions, 0), (slots, self.pad_slot), ([p + 1 for p in starts], 1),
                        ([], 0)]
            ints = None
        else:
            lists = step_lists(block_tables, starts, lengths, size, self.meta.paged.block_q)
            positions = lists.positions
            if any(rope_shift):
                positions = [p + shift for p, shift in zip(lists.positions,
                                                           (s for s, n in zip(rope_shift, lengths) for _ in range(n)))]
            segments = [(token_ids, 0), (positions, 0), (lists.slots, self.pad_slot), (lists.seq_lens, 0),
                        (sample_rows, 0)]
            # Padding sequences are empty (they start where the step's tokens end); padding programs point at
            # sequence `seqs`, always a padding one.
            ints = [(lists.query_start, t), (lists.qblock_seq, self.seqs), (lists.qblock_first, 0)]
        self.longs.copy_(torch.tensor(_packed(segments, self._long_sizes, 2), dtype=torch.long), non_blocking=True)
        if ints is not None:
            self.ints.copy_(torch.tensor(_packed(ints, self._int_sizes, 4), dtype=torch.int32), non_blocking=True)
        width = max(map(len, block_tables))
        tables = torch.tensor([x for bt in block_tables for x in (bt + [0] * (width - len(bt)))], dtype=torch.int32)
        self.block_tables[:b, :width].copy_(tables.view(b, width), non_blocking=True)

    def forward(self, model: torch.nn.Module) -> torch.Tensor:
        hidden = model(self.input_ids, self.positions, self.meta)
        if not self.decode:
            hidden = hidden.index_select(0, self.sample_rows)
        return model.compute_logits(hidden)


def _views(buf: torch.Tensor, sizes: list[int], align: int) -> list[torch.Tensor]:
    out, o = [], 0
    for n in sizes:
        out.append(buf[o:o + n])
        o += _round_up(n, align)
    return out


def _packed(segments: list[tuple[list[int], int]], sizes: list[int], align: int) -> list[int]:
    """Each segment's values, padded with its fill value to the bucket's size, then to the alignment."""
    out: list[int] = []
    for (values, fill), n in zip(segments, sizes):
        out += values
        out += [fill] * (n - len(values))
        out += [0] * (_round_up(n, align) - n)
    return out


def bucket_shape(decode: bool, tokens: int, *, max_batch: int, heads_per_kv: int, num_kv_heads: int, num_sms: int,
                 max_kv_len: int | None = None) -> dict:
    """A bucket's sequences, kernel programs, query block and key-range splits (see `Bucket`)."""
    block_m, block_q = query_heads_per_program(heads_per_kv, tokens, 1 if decode else tokens)
    seqs = min(tokens, max_batch)
    # Decode: one program per sequence. Mixed: the query blocks if every token belonged to one sequence, plus
    # one partial block per sequence at most.
    blocks = tokens if decode else -(-tokens // block_q)
    # Splits for the longest context (None: unknown at capture), over the programs a step of one long chunk
    # has; a step of many short sequences leaves splits without keys, which cost little.
    return dict(seqs=seqs, programs=tokens if decode else blocks + seqs, block_m=block_m, block_q=block_q,
                splits=choose_splits(blocks * num_kv_heads, max_kv_len, num_sms))


class StepGraphs:
    def __init__(self, model: torch.nn.Module, *, max_batch: int, max_tokens: int, max_blocks_per_seq: int,
                 block_size: int, pad_slot: int, heads_per_kv: int, num_kv_heads: int, device: torch.device,
                 mixed: bool = True):
        self.model = model
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_blocks = max_blocks_per_seq
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        # Rows of padding sequences past the step's are never read (no keys); one extra row for `seqs`.
        self.block_tables = torch.zeros(max_batch + 1, max_blocks_per_seq, dtype=torch.int32, device=device)

        def bucket(decode: bool, tokens: int, max_kv_len: int | None = None) -> Bucket:
            shape = bucket_shape(decode, tokens, max_batch=max_batch, heads_per_kv=heads_per_kv,
                                 num_kv_heads=num_kv_heads, num_sms=num_sms, max_kv_len=max_kv_len)
            return Bucket(decode=decode, tokens=tokens, **shape, block_tables=self.block_tables, pad_slot=pad_slot,
                          device=device)

        self.decode = {b: bucket(True, b) for b in batch_buckets(max_batch)}
        # Small decode batches over short contexts: no split (one program per KV head reads them all), since
        # split partials and the merge kernel cost as much as the attention itself there.
        self.decode_short = {b: bucket(True, b, SHORT_CONTEXT) for b in self.decode
                             if choose_splits(b * num_kv_heads, SHORT_CONTEXT, num_sms)
                             != self.decode[b].meta.paged.num_splits}
        self.mixed = {t: bucket(False, t) for t in mixed_buckets(max_tokens)} if mixed else {}
        self._decode_of = [next((b for b in self.decode if b >= n), None) for n in range(max_batch + 1)]
        self.max_mixed = max(self.mixed, default=0)
        self._mixed_of = [next((t for t in sorted(self.mixed) if t >= n), None) for n in range(self.max_mixed + 1)]
        self.replays = {"decode": 0, "mixed": 0}
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        # Largest first: the smaller graphs reuse its pool memory. Every TP rank captures in the same order.
        for b in [*sorted(self.decode.values(), key=lambda b: -b.tokens),
                  *sorted(self.decode_short.values(), key=lambda b: -b.tokens),
                  *sorted(self.mixed.values(), key=lambda b: -b.tokens)]:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile, autotune and warm the allocator outside the capture
                for _ in range(2):
                    b.forward(self.model)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: NCCL's watchdog thread (tensor parallel) may query events during the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                b.logits = b.forward(self.model)
            pool = graph.pool()
            b.graph = graph
        torch.cuda.synchronize()

    def bucket_for(self, token_ids: list[int], starts: list[int], block_tables: list[list[int]],
                   num_sample_rows: int) -> Bucket | None:
        """The graph that runs this step, or None (run it eagerly)."""
        n, t = len(starts), len(token_ids)
        if n > self.max_batch or max(map(len, block_tables)) > self.max_blocks:
            return None
        if t == n == num_sample_rows:
            b = self._decode_of[n]
            if b in self.decode_short and max(starts) < SHORT_CONTEXT:
                return self.decode_short[b]
            return self.decode[b]
        if t <= self.max_mixed:
            bucket = self.mixed[self._mixed_of[t]]
            return bucket if num_sample_rows <= bucket.seqs else None
        return None

    def replay(self, bucket: Bucket, token_ids: list[int], starts: list[int], lengths: list[int],
               block_tables: list[list[int]], sample_rows: list[int], rope_shift: list[int] = ()) -> torch.Tensor:
        """Logits [len(sample_rows), V] of the step (the rows' order)."""
        bucket.fill(token_ids, starts, lengths, block_tables, sample_rows, self.block_size, rope_shift)
        bucket.graph.replay()
        self.replays["decode" if bucket.decode else "mixed"] += 1
        return bucket.logits[:len(sample_rows)]
