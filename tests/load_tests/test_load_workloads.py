"""Workload generators: deterministic for a seed, with the configured sharing structure, lengths
and arrival processes."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from load_tests.workloads import (
    PLACEHOLDER_ANSWER,
    Arrival,
    LengthDist,
    LongContextConfig,
    Message,
    MultiTurnConfig,
    RatePhase,
    RequestSpec,
    ShareGPTConfig,
    arrival_times,
    burst_phases,
    generate,
    preset,
    ramp_phases,
)


@pytest.mark.parametrize("cfg", [
    MultiTurnConfig(conversations=6, turns=3, system_prompt_tokens=20, arrival=Arrival(kind="poisson", rate=5)),
    ShareGPTConfig(requests=20, arrival=Arrival(kind="poisson", phases=burst_phases(1, 5, 2, 1, 1))),
    LongContextConfig(documents=2, document_tokens=50, questions_per_document=3),
], ids=lambda c: c.kind)
def test_same_seed_same_workload_other_seed_differs(cfg):
    a, b = generate(cfg), generate(cfg.model_copy())
    assert a.model_dump() == b.model_dump()
    c = generate(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert [s.model_dump() for s in c.requests] != [s.model_dump() for s in a.requests]


def test_multiturn_sharing_structure():
    cfg = MultiTurnConfig(conversations=40, turns=3, system_prompts=4, sharing_ratio=0.75, system_prompt_tokens=30,
                          think_time_s=0.5)
    wl = generate(cfg)
    assert len(wl.requests) == 40 * 3
    first = [s for s in wl.requests if s.turn == 0]
    systems = [s.messages[0].content for s in first]
    counts = {t: systems.count(t) for t in set(systems)}
    shared = {t: n for t, n in counts.items() if n > 1}
    # round(0.75 * 40) = 30 conversations over a pool of 4 (round robin) + 10 private prompts.
    assert sorted(shared.values()) == [7, 7, 8, 8]
    assert len(counts) == 4 + 10
    assert all(len(t.split()) >= 30 for t in systems)


def test_multiturn_turns_grow_the_prefix_and_chain():
    wl = generate(MultiTurnConfig(conversations=3, turns=4, system_prompt_tokens=10, max_tokens=7, think_time_s=0.25))
    by_id = {s.id: s for s in wl.requests}
    for s in wl.requests:
        assert s.max_tokens == 7
        if s.turn == 0:
            assert s.after is None and s.think_time_s == 0.0
            assert [m.role for m in s.messages] == ["system", "user"]
            continue
        prev = by_id[s.after]
        assert prev.session_id == s.session_id and prev.turn == s.turn - 1
        assert s.think_time_s == 0.25
        # previous request + its answer (placeholder pointing at it) + a new user message
        assert s.messages[: len(prev.messages)] == prev.messages
        answer, new = s.messages[len(prev.messages):]
        assert answer == Message(role="assistant", content=PLACEHOLDER_ANSWER, answer_of=prev.id)
        assert new.role == "user" and new.content
    # any prefix of the list is self-contained: a turn never precedes its predecessor
    seen = set()
    for s in wl.requests:
        assert s.after is None or s.after in seen
        seen.add(s.id)


def test_sharing_ratio_zero_and_one():
    private = generate(MultiTurnConfig(conversations=8, turns=1, sharing_ratio=0.0, system_prompt_tokens=5))
    assert len({s.messages[0].content for s in private.requests}) == 8
    shared = generate(MultiTurnConfig(conversations=8, turns=1, system_prompts=2, sharing_ratio=1.0,
                                      system_prompt_tokens=5))
    assert len({s.messages[0].content for s in shared.requests}) == 2


def test_sharegpt_lengths_are_clipped_lognormal():
    cfg = ShareGPTConfig(requests=2000, input_tokens=LengthDist(median=100, sigma=1.0, min=10, max=400),
                         output_tokens=LengthDist(median=50, sigma=0.8, min=2, max=300), api="completions")
    wl = generate(cfg)
    ins = np.array([len(s.prompt.split()) for s in wl.requests])
    outs = np.array([s.max_tokens for s in wl.requests])
    assert all(s.messages is None for s in wl.requests)
    assert ins.min() >= 10 and ins.max() <= 400 and outs.min() >= 2 and outs.max() <= 300
    assert 85 <= np.median(ins) <= 115 and 42 <= np.median(outs) <= 58
    assert (ins == 400).sum() > 20  # the long tail hits the clip: it is lognormal, not narrow
    assert len({s.prompt for s in wl.requests}) == 2000  # no accidental sharing


def test_long_context_questions_share_their_document():
    wl = generate(LongContextConfig(documents=3, document_tokens=200, questions_per_document=4, question_tokens=5))
    assert len(wl.requests) == 12
    docs = {}
    for s in wl.requests:
        content = s.messages[0].content
        assert len(content.split()) >= 200
        docs.setdefault(s.session_id, set()).add(content.split("\n\nQuestion")[0])
    assert len(docs) == 3 and all(len(v) == 1 for v in docs.values())
    assert len({next(iter(v)) for v in docs.values()}) == 3
    # shuffled: not all questions of one document in a row
    sessions = [s.session_id for s in wl.requests]
    assert sessions != sorted(sessions)


def test_poisson_and_fixed_rate_arrivals():
    rng = np.random.default_rng(0)
    t = arrival_times(Arrival(kind="poisson", rate=10.0), 5000, rng)
    assert np.all(np.diff(t) >= 0)
    assert 9.5 <= len(t) / t[-1] <= 10.5
    gaps = np.diff(t)
    assert 0.8 <= gaps.std() / gaps.mean() <= 1.2  # exponential gaps: cv about 1
    f = arrival_times(Arrival(kind="fixed_rate", rate=4.0), 5, rng)
    assert f == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert arrival_times(Arrival(concurrency=3), 4, rng) == [0.0] * 4


def test_burst_and_ramp_phases_shape_the_rate():
    rng = np.random.default_rng(1)
    phases = burst_phases(base_rate=2.0, peak_rate=20.0, base_s=10.0, burst_s=5.0, bursts=1)  # 0-10, 10-15, 15-25
    t = np.array(arrival_times(Arrival(kind="poisson", phases=phases), 10_000, rng))
    assert t[-1] <= 25.0
    assert 20 * 5 * 0.75 <= ((t >= 10) & (t < 15)).sum() <= 20 * 5 * 1.25
    assert 2 * 10 * 0.5 <= (t < 10).sum() <= 2 * 10 * 1.6
    # fixed-rate ramp 0 -> 10 req/s over 10 s: 50 requests, exactly where the integral says
    ramp = Arrival(kind="fixed_rate", phases=[RatePhase(duration_s=10, start_rate=0.0, end_rate=10.0)])
    r = arrival_times(ramp, 1000, rng)
    assert len(r) == 51  # events 0..50 fit in an integral of 50
    assert r[8] == pytest.approx(4.0)  # 0.5 * t^2 = 8  ->  t = 4
    assert np.all(np.diff(np.diff(r)) <= 1e-9)  # gaps shrink as the rate rises
    up = ramp_phases(1.0, 5.0, ramp_s=10, hold_s=5, down_s=10)
    assert Arrival(kind="poisson", phases=up).offered_load == pytest.approx((3 * 10 + 5 * 5 + 3 * 10) / 25)


def test_validation():
    with pytest.raises(ValidationError):
        RequestSpec(id="x", session_id="x", max_tokens=1)
    with pytest.raises(ValidationError):
        RequestSpec(id="x", session_id="x", max_tokens=1, prompt="a", messages=[Message(role="user", content="a")])
    with pytest.raises(ValidationError):
        Arrival(kind="poisson")
    with pytest.raises(ValueError):
        preset("burst", arrival=Arrival(concurrency=2))
    with pytest.raises(ValueError):
        preset("nope")


def test_presets_size_and_options():
    assert len(generate(preset("multiturn", requests=10)).requests) == 12  # 3 conversations of 4 turns
    assert len(generate(preset("long_context", requests=8)).requests) == 8
    wl = generate(preset("sharegpt", requests=5, seed=3, ignore_eos=True, arrival=Arrival(kind="poisson", rate=2)))
    assert len(wl.requests) == 5 and all(s.extra_body == {"ignore_eos": True} for s in wl.requests)
    assert wl.config.arrival.rate == 2 and wl.config.seed == 3
    burst = generate(preset("burst", requests=50))
    assert burst.config.arrival.phases and len(burst.requests) <= 50
