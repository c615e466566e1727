"""The routing benchmark's workload model: affinity and random replica choice replayed through LRU block
caches, on crafted conversations whose hit rates are known, and on the benchmark's own workload."""
from __future__ import annotations

import pytest

from load_tests.bench_model import build_word_tokenizer
from load_tests.routing_model import Request, hit_rates, replay, requests_of
from load_tests.workloads import Arrival, LengthDist, MultiTurnConfig, generate

BS = 16


def _two_turn_conversations(n: int) -> list[Request]:
    """n conversations of two turns, nothing shared between them: turn 1 is 64 tokens of its own, turn 2 is
    turn 1 + a 16-token answer + 32 new tokens, so turn 2 can reuse 80 of its 112 tokens on turn 1's replica."""
    turn1, turn2 = [], []
    for c in range(n):
        own = [1000 * c + i for i in range(200)]
        p1 = own[:64]
        turn1.append(Request(f"c{c}", p1, own[64:81]))
        p2 = own[:112]
        turn2.append(Request(f"c{c}", p2, own[112:129]))
    return turn1 + turn2  # the closed loop's order: every turn 1, then every turn 2


def test_one_replica_caches_alike_under_any_choice():
    reqs = _two_turn_conversations(20)
    rates = hit_rates(reqs, replicas=1, capacity_blocks=10_000, block_size=BS)
    assert rates.affinity == rates.random == pytest.approx(20 * 80 / (20 * (64 + 112)))


def test_random_choice_finds_the_previous_turn_one_time_in_n():
    reqs = _two_turn_conversations(400)
    rates = hit_rates(reqs, replicas=4, capacity_blocks=10_000, block_size=BS, seed=3)
    assert rates.affinity == pytest.approx(80 / 176)
    assert 3.3 <= rates.ratio <= 4.9  # 1/4 expected; 400 draws


def test_lookup_leaves_the_last_token_to_compute():
    p = list(range(64))  # four full blocks, sent twice to one replica
    assert replay([Request("a", p, [0]), Request("a", p, [0])], lambda i, r: 0, 1, 100, BS) == pytest.approx(48 / 128)


def test_caches_hold_the_given_number_of_blocks():
    reqs = _two_turn_conversations(200)
    ample = hit_rates(reqs, 4, 10_000, BS, seed=1)
    # 50 conversations per home replica, 8 blocks each at the end: all of it fits
    assert hit_rates(reqs, 4, 400, BS, seed=1).affinity == ample.affinity
    # room for the turn 1s only: each turn 2's new blocks evict the least recently stored turn 1, the next
    # one to come back (LRU under a scan)
    assert hit_rates(reqs, 4, 250, BS, seed=1).affinity < ample.affinity / 10
    tiny = hit_rates(reqs, 4, 4, BS, seed=1)  # less than a conversation: nothing survives to its next turn
    assert tiny.affinity == tiny.random == 0.0


def test_benchmark_workload_model():
    """The benchmark's own workload: turn 2 starts with turn 1's prompt and answer, and more replicas leave
    random choice fewer hits while the affinity ceiling stays."""
    tok = build_word_tokenizer()
    wl = generate(MultiTurnConfig(seed=0, conversations=12, turns=3, system_prompt_tokens=20, max_tokens=10,
                                  user_tokens=LengthDist(median=30), arrival=Arrival(concurrency=4)))
    reqs = requests_of(wl, tok)
    assert [r.session for r in reqs[:12]] == [s.session_id for s in wl.requests if s.turn == 0]
    first = {r.session: r for r in reqs[:12]}
    for r in reqs[12:24]:
        assert r.prompt[:len(first[r.session].cached_after)] == first[r.session].cached_after
        assert len(r.answer) == 10 and r.cached_after == r.prompt + r.answer[:9]  # not the last token's block
    two, six = (hit_rates(reqs, n, 10_000, BS) for n in (2, 6))
    assert two.affinity == pytest.approx(six.affinity, abs=0.02)
    assert six.random < two.random < two.affinity
