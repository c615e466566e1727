"""BlockManager: the paged KV pool's bookkeeping — which block holds which sequence's tokens, reference
counts, and the prefix cache (full blocks addressed by chained block hash, kept after their last user
frees them and evicted least-recently-freed first).

Hashes come only from `replicas.engine.hashing` so the router's index and this cache agree. Blocks stored into
and evicted from the cache are recorded as hash lists that the engine hands to its hooks once per step.
"""
from __future__ import annotations

from collections import OrderedDict
from itertools import islice

from replicas.engine.hashing import ROOT_HASH, hash_block
from replicas.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is registered in the prefix cache


FREED = -1  # a block-table entry released by the sliding window: never read again


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 extra_key: bytes = b"", uncached_past: int = 0, window: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # longrope: a sequence longer than this rotates every position with other factors, so its KV differs
        # from the same tokens' in a shorter sequence; it neither hits nor fills the cache (0: no such limit).
        self.uncached_past = uncached_past
        # Sliding-window models whose every layer slides: a query at p reads keys (p - window, p] only, so the
        # blocks wholly before the window of a sequence's next token are released as it advances (their
        # entries in its block table become FREED; cached ones stay findable for prefix hits until evicted).
        self.window = window
        self.extra_key = extra_key
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: never-cached ones at the front (reused first), cached ones
        # appended as they are freed, so the front holds the least recently used cached block.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stored: list[int] = []  # hashes newly cached since the last drain_events()
        self.evicted: list[int] = []
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_held(self, num_tokens: int, step_tokens: int) -> int:
        """The most blocks a sequence of `num_tokens` holds at once, computing up to `step_tokens` per step:
        all of them, or with a sliding window only the window's and the step's (plus a partial block each)."""
        if not self.window:
            return self.blocks_needed(num_tokens)
        return min(self.blocks_needed(num_tokens), self.blocks_needed(self.window + step_tokens) + 1)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """seq.block_hashes extended to cover its first `num_blocks` full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        extra = self.extra_key if seq.hash_extra is None else seq.hash_extra  # a salted request's own key
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, seq.token_ids[i * bs:(i + 1) * bs],
                                     extra))
        return hashes

    def lookup(self, seq: Sequence) -> list[int]:
        """Block ids caching the longest prefix of `seq`. At least one token is left to compute: its
        logits are needed, and a full cached block is never written into."""
        if not self._cacheable(seq):
            return []
        hits = []
        # The router's hashes (seq.block_hashes) cover every full block of the prompt, the last one too
        # when the prompt fills it: only the first `n` may hit.
        n = (seq.num_tokens - 1) // self.block_size
        for h in islice(self._hashes(seq, n), n):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> bool:
        """Give `seq` blocks for its next `num_new_tokens` tokens. `hits` (from lookup) admits a
        sequence that holds no blocks: those cached blocks are shared and their tokens count as computed.
        Returns False, changing nothing, when the pool is short."""
        admit = hits is not None
        if admit:
            assert not seq.block_table, "admitting a sequence that still holds blocks"
            num_computed = len(hits) * self.block_size
        else:
            hits, num_computed = [], seq.num_computed_tokens
        have = len(seq.block_table) + len(hits)
        need = self.blocks_needed(num_computed + num_new_tokens) - have
        # Hits wholly behind the window of the first token to compute are never read: they stay where they are
        # (FREED in the table), so a long cached prefix does not have to fit the pool.
        behind = self._behind_window(num_computed) if admit else 0
        kept = hits[behind:]
        reclaimed = sum(1 for b in kept if self.blocks[b].ref_count == 0)  # hits sitting in the free queue
        if need + reclaimed > len(self.free):
            return False
        if admit:
            for b in kept:
                block = self.blocks[b]
                if block.ref_count == 0:
                    del self.free[b]
                block.ref_count += 1
            seq.block_table = [FREED] * min(behind, len(hits)) + list(kept)
            seq.num_hashed_blocks = len(hits)
            seq.num_computed_tokens = num_computed
            if self.enable_prefix_caching:
                self.prefix_query_tokens += seq.num_tokens
                self.prefix_hit_tokens += num_computed
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_computed
        for _ in range(need):
            seq.block_table.append(self._take_free())
        self._cache_full_blocks(seq, (num_computed + num_new_tokens) // self.block_size)
        if self.window:
            self._release_outside_window(seq, num_computed)
        return True

    def _behind_window(self, start: int) -> int:
        """Leading blocks that no query from position `start` on sees (0 without a window)."""
        return max(0, start - self.window + 1) // self.block_size if self.window else 0

    def _release_outside_window(self, seq: Sequence, start: int) -> None:
        """Release the blocks no query from position `start` on can see: positions < start - window + 1.
        Full blocks, so already registered in the prefix cache where caching applies."""
        end = self._behind_window(start)
        table = seq.block_table
        for i in range(min(end, len(table))):
            if table[i] != FREED:
                self._release(self.blocks[table[i]])
                table[i] = FREED

    def _cacheable(self, seq: Sequence) -> bool:
        return self.enable_prefix_caching and not (self.uncached_past and seq.num_tokens > self.uncached_past)

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self._uncache(block)
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
            self.evicted.append(block.hash)
        block.hash = None

    def _cache_full_blocks(self, seq: Sequence, num_full: int) -> None:
        """Register the blocks that will be full once this step's tokens are written. Other sequences
        may hit them in the same step: every layer writes the whole batch's K/V before attending."""
        if not self._cacheable(seq) or num_full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            h, block = hashes[i], self.blocks[seq.block_table[i]]
            if h not in self.cached:  # a block with the same content already cached keeps the entry
                self.cached[h] = block.block_id
                block.hash = h
                self.stored.append(h)
        seq.num_hashed_blocks = num_full

    def free_seq(self, seq: Sequence, *, uncache: bool = False) -> None:
        """Release `seq`'s blocks. Cached ones stay findable until evicted; `uncache` drops them
        (their KV may be garbage, e.g. after a failed forward)."""
        # Tail blocks first: they are queued before the head blocks and so evicted first, keeping
        # the shared-prefix heads of the cache alive longest.
        for block_id in reversed(seq.block_table):
            if block_id == FREED:
                continue
            block = self.blocks[block_id]
            if uncache and block.hash is not None:
                self._uncache(block)
            self._release(block)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def _release(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block.block_id] = None
            if block.hash is None:
                self.free.move_to_end(block.block_id, last=False)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """(stored, evicted) block hashes since the last call, net of each other: a hash evicted and
        stored again in between is only in `stored`, so subscribers may apply the lists in any order."""
        if not self.stored and not self.evicted:
            return [], []
        stored = [h for h in self.stored if h in self.cached]
        evicted = [h for h in self.evicted if h not in self.cached]
        self.stored, self.evicted = [], []
        return stored, evicted
