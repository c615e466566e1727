"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once at start-up over
persistent input buffers, so a decode step is two small host-to-device copies and one replay instead of
~300 kernel launches from Python. Steps with a prefill chunk, or too large for the buckets, run eagerly.

A bucket larger than the batch runs padding rows: token 0 at position 0, writing its K/V into the pool's
spare block (`pad_slot`, never handed out), attending to one position; their logits are dropped.
"""
from __future__ import annotations

import torch

from replicas.engine.attention import AttentionMetadata
from replicas.engine.paged_metadata import PagedMetadata, choose_splits, query_heads_per_program


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, *, max_batch: int, max_blocks_per_seq: int, block_size: int,
                 pad_slot: int, heads_per_kv: int, num_kv_heads: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.pad_slot = pad_slot
        self.max_batch = max_batch
        self.max_blocks = max_blocks_per_seq
        self.buckets = batch_buckets(max_batch)
        self._bucket_of = [next(b for b in self.buckets if b >= n) for n in range(max_batch + 1)]
        # Rows: token ids, positions, slots, context lengths (int64, one copy per step).
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.inputs[2].fill_(pad_slot)
        self.inputs[3].fill_(1)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.qblock_first = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_m, self.block_q = query_heads_per_program(heads_per_kv, 1, 1)
        self.num_kv_heads = num_kv_heads
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0
        self._capture()

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.inputs[2, :bs], paged=PagedMetadata(
            block_tables=self.block_tables[:bs], seq_lens=self.inputs[3, :bs], query_start=self.query_start[:bs + 1],
            qblock_seq=self.query_start[:bs], qblock_first=self.qblock_first[:bs], block_m=self.block_m,
            block_q=self.block_q, num_splits=choose_splits(bs * self.num_kv_heads, None, self.num_sms)))
        hidden = self.model(self.inputs[0, :bs], self.inputs[1, :bs], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool memory
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile, autotune and warm the allocator outside the capture
                for _ in range(2):
                    self._forward(bs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: NCCL's watchdog thread (tensor parallel) may query events during the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, token_ids: list[int], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only step (one token per sequence, each sampling), or None when the step
        does not fit the captured graphs."""
        b = len(starts)
        if b > self.max_batch:
            return None
        width = max(map(len, block_tables))
        if width > self.max_blocks:
            return None
        bs = self._bucket_of[b]
        pad = bs - b
        size = self.block_size
        slots = [bt[p // size] * size + p % size for bt, p in zip(block_tables, starts)]
        host = torch.tensor([*token_ids, *[0] * pad, *starts, *[0] * pad, *slots, *[self.pad_slot] * pad,
                             *[p + 1 for p in starts], *[1] * pad], dtype=torch.long)
        self.inputs[:, :bs].copy_(host.view(4, bs), non_blocking=True)
        tables = torch.tensor([x for bt in block_tables for x in (bt + [0] * (width - len(bt)))], dtype=torch.int32)
        self.block_tables[:b, :width].copy_(tables.view(b, width), non_blocking=True)
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][:b]
