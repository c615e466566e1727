"""Scheduler: which sequences run this step and how many tokens each computes (vLLM v1 style).

One token budget per step covers decodes and prefill chunks alike: running sequences first (in
priority order), then waiting ones while budget, `max_num_seqs` and blocks last. When blocks run out
for a running sequence, the lowest-priority, latest-arrived running sequence is preempted: its blocks
are freed and it goes back to waiting, to recompute prompt + generated tokens later (mostly from the
prefix cache, which its freed blocks still populate).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from replicas.engine.block_manager import BlockManager
from replicas.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each computes this step
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key: the tail is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        # The routers weigh this replica's queued prefill against the prefill their cache saves: count
        # what admission will compute, not the prefix it will find cached (looked up again then).
        seq.waiting_prefill = seq.num_tokens - len(self.bm.lookup(seq)) * self.bm.block_size
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def pending_prefill_tokens(self) -> int:
        # A running sequence with one token left is decoding (or ends its prefill with one token: counted 0).
        return sum(s.waiting_prefill for s in self.waiting) + \
            sum(n for s in self.running if (n := s.num_tokens - s.num_computed_tokens) > 1)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
                i += 1
        # Admitting while preempting would only evict what was just freed for the running ones.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup(seq)
            n = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.allocate(seq, n, hits):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
        return out

    def recompute(self, seq: Sequence) -> None:
        """Drop a running sequence's KV so that its next steps compute all its tokens again (it stays running)."""
        self.bm.free_seq(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence, *, uncache: bool = False) -> None:
        """Remove a running or waiting sequence and free its blocks (finished, aborted or failed)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            self.bm.free_seq(seq, uncache=uncache)
            seq.status = SequenceStatus.FINISHED
