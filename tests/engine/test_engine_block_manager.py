"""Block manager and scheduler unit tests from small factories (no model)."""
from __future__ import annotations

import pytest

from replicas.engine.block_manager import BlockManager
from replicas.engine.hashing import block_hashes
from replicas.engine.protocol import SamplingParams
from replicas.engine.scheduler import Scheduler
from replicas.engine.sequence import Sequence, SequenceStatus

BS = 4
EXTRA = b"model\x00"


def make_bm(num_blocks=8, **kw) -> BlockManager:
    return BlockManager(num_blocks, BS, extra_key=EXTRA, **kw)


def make_seq(tokens, rid="r", priority=0, index=0) -> Sequence:
    return Sequence(rid, index, list(tokens), SamplingParams(), priority=priority)


def admit(bm: BlockManager, seq: Sequence, num_new: int | None = None) -> bool:
    hits = bm.lookup(seq)
    n = seq.num_tokens - len(hits) * BS if num_new is None else num_new
    ok = bm.allocate(seq, n, hits)
    if ok:
        seq.num_computed_tokens += n
    return ok


# ------------------------------------------------------------------ block manager


def test_allocate_and_free_counts():
    bm = make_bm()
    seq = make_seq(range(10))
    assert admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free_seq(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_growth_allocates_a_block_only_at_boundaries():
    bm = make_bm()
    seq = make_seq(range(8))
    admit(bm, seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(99)  # the 9th token starts block 3
    assert bm.allocate(seq, 1)
    assert len(seq.block_table) == 3


def test_stored_hashes_are_kvstore_block_hashes_and_partial_block_is_not_cached():
    bm = make_bm()
    tokens = list(range(10))
    admit(bm, make_seq(tokens))
    stored, evicted = bm.drain_events()
    assert stored == block_hashes(tokens, BS, EXTRA)  # two full blocks; the partial third is not cached
    assert len(stored) == 2 and evicted == []
    assert bm.drain_events() == ([], [])


def test_router_supplied_prompt_hashes_are_used():
    bm = make_bm()
    seq = Sequence("r", 0, list(range(8)), SamplingParams(), prompt_block_hashes=[11, 22])
    admit(bm, seq)
    assert bm.drain_events()[0] == [11, 22]


def test_prefix_hit_shares_blocks_with_refcounts():
    bm = make_bm()
    a, b = make_seq(range(10), "a"), make_seq(list(range(8)) + [50, 51, 52], "b")
    admit(bm, a)
    hits = bm.lookup(b)
    assert hits == a.block_table[:2]
    admit(bm, b)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 11
    assert [bm.blocks[x].ref_count for x in a.block_table[:2]] == [2, 2]
    assert bm.num_free_blocks == 8 - 3 - 1
    bm.free_seq(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 21


def test_fully_cached_prompt_still_computes_its_last_block():
    bm = make_bm()
    admit(bm, make_seq(range(8), "a"))
    again = make_seq(range(8), "b")
    assert len(bm.lookup(again)) == 1  # the block holding the last token is recomputed


def test_fully_cached_prompt_with_router_hashes_still_computes_its_last_block():
    # The router hashes every full block of the prompt; for a prompt that fills its last block, that
    # hash must not count as a hit (the prompt's last token would have no logits to sample from).
    bm = make_bm()
    admit(bm, make_seq(range(8), "a"))
    again = Sequence("b", 0, list(range(8)), SamplingParams(), prompt_block_hashes=block_hashes(range(8), BS, EXTRA))
    assert len(again.block_hashes) == 2
    assert len(bm.lookup(again)) == 1
    assert admit(bm, again) and again.num_cached_tokens == 4 and again.num_computed_tokens == 8


def test_unreferenced_cached_block_is_reused_by_a_hit():
    bm = make_bm()
    a = make_seq(range(9), "a")
    admit(bm, a)
    cached = a.block_table[:2]
    bm.free_seq(a)
    b = make_seq(range(9), "b")
    admit(bm, b)
    assert b.block_table[:2] == cached and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 8 - 3


def test_uncached_free_blocks_are_used_before_evicting_cached_ones():
    bm = make_bm(num_blocks=4)
    a = make_seq(range(8), "a")
    admit(bm, a)
    bm.free_seq(a)
    b = make_seq([100, 101, 102], "b")  # one block: must come from the two never-cached ones
    admit(bm, b)
    assert b.block_table[0] not in a.block_table
    assert bm.drain_events()[1] == []


def test_lru_eviction_order():
    bm = make_bm(num_blocks=4)
    a, b = make_seq(range(8), "a"), make_seq(range(100, 108), "b")
    admit(bm, a)
    admit(bm, b)
    ha, hb = block_hashes(list(range(8)), BS, EXTRA), block_hashes(list(range(100, 108)), BS, EXTRA)
    bm.drain_events()
    bm.free_seq(a)  # a is least recently used; within a, the tail block goes first
    bm.free_seq(b)
    c = make_seq(range(200, 203), "c")
    admit(bm, c)
    assert bm.drain_events() == ([], [ha[1]])
    d = make_seq(range(300, 309), "d")
    admit(bm, d)
    stored, evicted = bm.drain_events()
    assert evicted == [ha[0], hb[1], hb[0]]
    assert stored == block_hashes(list(range(300, 309)), BS, EXTRA)


def test_evicted_then_stored_again_nets_out():
    bm = make_bm(num_blocks=2)
    a = make_seq(range(5), "a")
    admit(bm, a)
    bm.free_seq(a)
    bm.drain_events()
    h = block_hashes(list(range(4)), BS, EXTRA)[0]
    # Same content, but needs both blocks: the cached one is hit, not evicted.
    b = make_seq(range(6), "b")
    admit(bm, b)
    assert bm.drain_events() == ([], [])
    assert bm.cached[h] == b.block_table[0]


def test_allocation_failure_changes_nothing():
    bm = make_bm(num_blocks=3)
    a = make_seq(range(8), "a")
    admit(bm, a)
    big = make_seq(range(50, 62), "big")
    assert not admit(bm, big)
    assert big.block_table == [] and big.num_cached_tokens == -1
    assert bm.num_free_blocks == 1 and bm.prefix_query_tokens == 8


def test_uncache_on_free_forgets_garbage_blocks():
    bm = make_bm()
    a = make_seq(range(9), "a")
    admit(bm, a)
    stored, _ = bm.drain_events()
    bm.free_seq(a, uncache=True)
    assert bm.drain_events() == ([], stored[::-1])  # freed tail first
    assert bm.lookup(make_seq(range(9), "b")) == []
    assert bm.num_free_blocks == 8


def test_prefix_caching_off():
    bm = make_bm(enable_prefix_caching=False)
    admit(bm, make_seq(range(9), "a"))
    assert bm.lookup(make_seq(range(9), "b")) == []
    assert bm.drain_events() == ([], []) and bm.prefix_query_tokens == 0


# ------------------------------------------------------------------ scheduler


def make_sched(num_blocks=16, max_num_seqs=8, budget=16, **kw):
    bm = make_bm(num_blocks, **kw)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def fake_step(sched: Scheduler):
    """Apply a schedule as the engine would: tokens computed, a token sampled at the end of prefill."""
    out = sched.schedule()
    for seq, n in zip(out.seqs, out.num_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return out


def test_token_budget_chunks_a_long_prompt():
    sched = make_sched(budget=16)
    seq = make_seq(range(40))
    sched.add(seq)
    assert [fake_step(sched).num_tokens for _ in range(4)] == [[16], [16], [8], [1]]


def test_decodes_go_first_and_prefill_fills_the_budget():
    sched = make_sched(budget=8)
    a = make_seq(range(5), "a")
    sched.add(a)
    fake_step(sched)
    b = make_seq(range(100, 120), "b")
    sched.add(b)
    out = fake_step(sched)
    assert out.seqs == [a, b] and out.num_tokens == [1, 7]


def test_priority_then_fcfs():
    sched = make_sched(max_num_seqs=1)
    low, first, second = make_seq(range(4), "low", priority=5), make_seq(range(4), "p0a"), make_seq(range(4), "p0b")
    for s in (low, first, second):
        sched.add(s)
    order = []
    for _ in range(12):
        out = fake_step(sched)
        if out.seqs and out.seqs[0] not in order:
            order.append(out.seqs[0])
        if out.seqs and out.seqs[0].num_output_tokens >= 2:
            sched.finish(out.seqs[0])
    assert order == [first, second, low]


def test_max_num_seqs():
    sched = make_sched(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(range(4), str(i)))
    assert len(fake_step(sched).seqs) == 2 and len(sched.waiting) == 1


def test_preemption_takes_lowest_priority_latest_and_requeues_it_first():
    # 4 blocks: a (priority 0) and b (priority 1) hold 2 each; a's growth needs a fifth.
    sched = make_sched(num_blocks=4, budget=64)
    a, b, c = make_seq(range(8), "a"), make_seq(range(10, 18), "b", priority=1), make_seq(range(20, 24), "c", 1)
    for s in (a, b):
        sched.add(s)
    fake_step(sched)
    sched.add(c)  # arrives after b with the same priority
    assert sched.bm.num_free_blocks == 0
    out = fake_step(sched)
    assert out.preempted == [b] and out.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting == [b, c]  # b keeps its arrival: ahead of c
    assert sched.num_preemptions == 1
    sched.finish(a)
    hits_before = sched.bm.prefix_hit_tokens
    out = fake_step(sched)
    # b recomputes prompt + its generated token; its head block is still in the cache it left behind
    # (a's new block evicted b's tail block, freed first).
    assert out.seqs[0] is b and out.num_tokens[0] == 9 - 4
    assert sched.bm.prefix_hit_tokens - hits_before == 4
    assert b.num_cached_tokens == 0  # usage reports the hit of the first admission


def test_a_sequence_preempts_itself_when_it_is_the_lowest():
    sched = make_sched(num_blocks=4, budget=64)
    a, b = make_seq(range(8), "a"), make_seq(range(10, 18), "b", priority=1)
    sched.add(a)
    sched.add(b)
    fake_step(sched)
    b.token_ids.extend([1] * 3)  # b now needs a third block before a asks for one
    b.num_computed_tokens = b.num_tokens - 1
    out = fake_step(sched)
    assert out.preempted == [b] and out.seqs == [a]


def test_pending_prefill_counts_what_admission_will_compute():
    """The routers' queued-work figure: a waiting prompt's cached prefix is not work (it is found again at
    admission); running prefills count their remaining chunk, decodes nothing."""
    sched = make_sched(num_blocks=16, max_num_seqs=1, budget=8)
    holder = make_seq(range(12), "holder")
    sched.add(holder)
    assert sched.pending_prefill_tokens() == 12  # nothing cached yet
    fake_step(sched)
    assert sched.pending_prefill_tokens() == 4  # its second chunk
    fake_step(sched)
    assert sched.pending_prefill_tokens() == 0  # decoding
    follow_up = make_seq([*range(12), 7, 50, 51, 52, 53], "follow-up")  # 3 of its blocks are cached
    sched.add(follow_up)
    assert sched.pending_prefill_tokens() == 17 - 12
    sched.add(make_seq(range(100, 110), "cold"))
    assert sched.pending_prefill_tokens() == 5 + 10


def test_finish_frees_waiting_and_running():
    sched = make_sched(num_blocks=4, max_num_seqs=1)
    a, b = make_seq(range(8), "a"), make_seq(range(8), "b")
    sched.add(a)
    sched.add(b)
    fake_step(sched)
    sched.finish(a)
    sched.finish(b)
    sched.finish(b)  # idempotent
    assert not sched.has_unfinished() and sched.bm.num_free_blocks == 4


@pytest.mark.parametrize("num_blocks", [6, 9])
def test_random_mix_never_leaks(num_blocks):
    import random
    rng = random.Random(num_blocks)
    sched = make_sched(num_blocks=num_blocks, budget=12, max_num_seqs=4)
    live = []
    for step in range(300):
        if rng.random() < 0.3:
            s = make_seq([rng.randrange(8) for _ in range(rng.randrange(1, 12))], str(step), rng.randrange(3))
            sched.add(s)
            live.append(s)
        fake_step(sched)
        for s in list(live):
            if s.num_output_tokens >= 8 or rng.random() < 0.03:  # finished or aborted
                sched.finish(s)
                live.remove(s)
    for s in live:
        sched.finish(s)
    assert sched.num_preemptions > 0
    assert sched.bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in sched.bm.blocks)
