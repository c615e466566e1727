"""Sampler semantics: greedy, filters (against HF warpers), penalties (hand-computed), seeded and
position-addressable draws, logprobs against a transformers forward pass."""
from __future__ import annotations

import math

import pytest
import torch

import replicas.engine.sampler as sampler_mod
from replicas.engine.protocol import SamplingParams
from replicas.engine.sampler import Sampler, SamplingBatch, apply_filters, apply_penalties, inverse_cdf, seed_for

V = 64


def P(**kw) -> SamplingParams:
    return SamplingParams(**kw)


def logits_for(*rows: int, vocab: int = V) -> torch.Tensor:
    """Deterministic logits per "sequence id", so a row's logits do not depend on its batch."""
    out = []
    for r in rows:
        g = torch.Generator().manual_seed(1000 + r)
        out.append(torch.randn(vocab, generator=g) * 2)
    return torch.stack(out)


def sample(sampler, logits, rows):
    return sampler(logits.clone(), SamplingBatch.build(rows)).token_ids


def test_greedy_is_argmax_and_fast_path():
    logits = logits_for(0, 1, 2, 3)
    b = SamplingBatch.build([(P(temperature=0), [1], [], 0)] * 4)
    assert b.greedy_only
    assert Sampler()(logits.clone(), b).token_ids == logits.argmax(-1).tolist()
    # Greedy rows mixed with sampled ones still take the argmax.
    rows = [(P(temperature=0), [1], [], 0), (P(temperature=1.5, seed=3), [1], [], 0)] * 2
    b = SamplingBatch.build(rows)
    assert not b.greedy_only
    out = Sampler()(logits.clone(), b).token_ids
    assert out[0::2] == logits.argmax(-1)[0::2].tolist()


def test_fast_path_only_without_penalties():
    assert not SamplingBatch.build([(P(temperature=0, repetition_penalty=1.2), [1], [], 0)]).greedy_only
    assert not SamplingBatch.build([(P(temperature=0, presence_penalty=0.5), [1], [], 0)]).greedy_only
    assert SamplingBatch.build([(P(temperature=0, logprobs=2), [1], [], 0)]).greedy_only


def test_seeded_reproducible_and_independent_of_batch():
    s = P(temperature=1.0, seed=1234)
    target = (s, [5, 6], [7, 8, 9], 0)  # sequence 42 at output position 3
    alone = sample(Sampler(seed=0), logits_for(42), [target])[0]
    others = [(P(temperature=0.8), [1], [], 0), (P(temperature=0), [2], [3], 0), (P(seed=9), [1], [2], 1)]
    for pos in range(4):  # target in every slot of a batch, different global generator each time
        rows = others[:pos] + [target] + others[pos:]
        ids = [1, 2, 3][:pos] + [42] + [1, 2, 3][pos:]
        for sampler_seed in (0, 7):
            assert sample(Sampler(seed=sampler_seed), logits_for(*ids), rows)[pos] == alone
    # And the draw really depends on seed, choice index and position.
    draws = {sample(Sampler(), logits_for(42), [(P(temperature=1.0, seed=sd), [5], [0] * pos, idx)])[0]
             for sd in range(4) for idx in range(3) for pos in range(4)}
    assert len(draws) > 5


def test_resumed_position_draws_same_tokens():
    """A request that fails over at position p and resumes elsewhere continues with the same tokens."""
    s = P(temperature=1.0, top_p=0.95, seed=77)

    def run(sampler, start_output, steps):
        out = list(start_output)
        for _ in range(steps):
            filler = [(P(temperature=0.7), [3], [], 0)] * (len(out) % 3)  # other traffic varies per step
            rows = filler + [(s, [1, 2, 3], out, 1)]
            logits = logits_for(*[9] * len(filler), len(out))  # logits depend on the position only
            out.append(sample(sampler, logits, rows)[-1])
        return out

    first = run(Sampler(seed=1), [], 12)
    resumed = run(Sampler(seed=2), first[:5], 7)
    assert resumed == first
    assert len(set(first)) > 3  # it is really sampling


def test_seed_mix_is_stable():
    # xxh64 of fixed bytes: the same on every machine and process, unlike hash().
    assert seed_for(1, 0, 0) == seed_for(1, 0, 0) != seed_for(1, 0, 1) != seed_for(1, 1, 0)
    assert seed_for(-1, 0, 0) == seed_for((1 << 64) - 1, 0, 0)
    assert seed_for(1, 2, 3) == 0x8799e152e5c0cdfa  # pinned: a change breaks resume across versions


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_distribution(seeded):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 6000
    rows = [(P(temperature=1.0, seed=5 if seeded else None), [0], [0] * i, 0) for i in range(n)]
    out = Sampler(seed=3)(logits.expand(n, -1).clone(), SamplingBatch.build(rows)).token_ids
    freq = torch.bincount(torch.tensor(out), minlength=6).float() / n
    assert torch.allclose(freq, logits.softmax(-1), atol=0.02), freq


def test_temperature_changes_the_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0])
    n = 6000
    rows = [(P(temperature=0.5, seed=1), [0], [0] * i, 0) for i in range(n)]
    out = Sampler()(logits.expand(n, -1).clone(), SamplingBatch.build(rows)).token_ids
    freq = torch.bincount(torch.tensor(out), minlength=3).float() / n
    assert torch.allclose(freq, (logits / 0.5).softmax(-1), atol=0.02), freq


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = logits_for(*range(8))
    greedy = logits.argmax(-1).tolist()
    for params in (P(temperature=1.3, top_k=1, seed=3), P(temperature=1.3, top_p=1e-6, seed=3),
                   P(temperature=1.3, top_k=1), P(temperature=1.3, top_p=1e-6, top_k=5)):
        assert sample(Sampler(), logits, [(params, [1], [], i) for i in range(8)]) == greedy


def test_min_p_masks_relative_to_max():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0, -2.0]])
    probs = logits.softmax(-1)
    b = SamplingBatch.build([(P(temperature=1.0, min_p=0.2), [], [], 0)])
    out = apply_filters(logits.clone(), b)
    keep = probs >= 0.2 * probs.max()
    assert keep.tolist() == [[True, True, False, False, False]]
    assert torch.equal(torch.isfinite(out), keep)
    draws = Sampler()(logits.expand(500, -1).clone(),
                      SamplingBatch.build([(P(temperature=1.0, min_p=0.2), [], [], 0)] * 500)).token_ids
    assert set(draws) == {0, 1}


def _hf_reference(row_logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    x = row_logits.view(1, -1).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


@pytest.mark.parametrize("candidates", [8, 10**9], ids=["cpu-candidates", "full-sort"])
def test_filters_match_hf_warpers_per_row(monkeypatch, candidates):
    """Per-row settings in one batch equal HF's warper chain. Few candidates exercise the CPU path's
    fallback to a full sort (flat rows) and its shortcut (peaked rows); many is the GPU's full sort."""
    monkeypatch.setattr(sampler_mod, "_CPU_TOP_P_CANDIDATES", candidates)
    params = [P(temperature=0.7, top_k=5), P(temperature=1.3, top_p=0.8), P(temperature=1.0, min_p=0.1),
              P(temperature=0.9, top_k=10, top_p=0.6, min_p=0.05), P(temperature=1.1), P(temperature=0.5, top_k=3),
              P(temperature=2.0, top_p=0.3, min_p=0.2)]
    logits = logits_for(*range(len(params)))
    logits[1] *= 0.1  # flat: its nucleus reaches past 8 candidates
    logits[3, :3] += 20  # peaked: the best 3 hold nearly everything
    for subset in (params, [params[0], params[5], params[4]], [params[2], params[4]], [params[1], params[3]],
                   [params[3], params[4], params[0]]):  # every top-p row has a top-k: only k candidates
        n = len(subset)
        b = SamplingBatch.build([(p, [], [], 0) for p in subset])
        out = apply_filters(logits[:n].clone(), b)
        for i, p in enumerate(subset):
            ref = _hf_reference(logits[i], p)
            assert torch.equal(torch.isinf(out[i]), torch.isinf(ref)), (i, p)
            fin = torch.isfinite(ref)
            assert torch.allclose(out[i][fin], ref[fin], atol=1e-6)


def test_rows_without_top_p_keep_their_whole_tail():
    """A top_p = 1 row beside top-p rows must not lose tokens when its cumulative sum rounds to 1."""
    logits = torch.randn(3, 50000, generator=torch.Generator().manual_seed(0)) * 0.01
    logits[:, 0] = 30.0  # the head holds all but ~1e-9 of the mass
    rows = [(P(temperature=1.0), [], [], 0), (P(temperature=1.0, top_p=0.5), [], [], 0),
            (P(temperature=1.0, top_k=5), [], [], 0)]
    out = apply_filters(logits.clone(), SamplingBatch.build(rows))
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).sum() == 1
    assert torch.isfinite(out[2]).sum() == 5


def test_inverse_cdf_edges_land_on_tokens_with_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 1.0])  # 1.0: where fp32 rounding of u * total can land
    for chunk in (256, 2, 4):
        assert inverse_cdf(probs.clone(), u, chunk=chunk).tolist() == [1, 1, 3, 3]


def test_inverse_cdf_rounding_below_a_chunk_start():
    """Found by search: u * total lands in chunk 1, but fp32 puts it a hair before chunk 1's
    computed start; the pick must still be a token with mass (index 4 has none)."""
    probs = torch.tensor([[0.455627977848053, 0.6323062777519226, 0.3488934636116028, 0.40171730518341064,
                           0.0, 0.16885894536972046, 0.2938884496688843, 0.518521785736084]])
    assert inverse_cdf(probs, torch.tensor([0.6520092487335205]), chunk=4).tolist() == [5]


@pytest.mark.parametrize("chunk", [3, 4, 256])
def test_two_level_inverse_cdf_equals_one_level(chunk):
    """Small integer masses and dyadic u keep every sum exact, so the pick must match exactly,
    across chunk boundaries, a partial last chunk and empty chunks."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 4, (400, 10), generator=g).float() * (torch.rand(400, 10, generator=g) < 0.6)
    probs[:, 9] += 1  # every row has mass
    u = torch.randint(0, 1025, (400,), generator=g).float() / 1024
    cdf = probs.double().cumsum(-1)
    target = u.double().view(-1, 1) * cdf[:, -1:]
    ref = torch.minimum((cdf <= target).sum(-1), torch.full((400,), 9))
    assert torch.equal(inverse_cdf(probs.clone(), u, chunk=chunk), ref)


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]])
    rows = [(P(temperature=0, repetition_penalty=2.0), [0, 1], [1, 3], 0),  # seen: 0, 1, 3
            (P(temperature=0), [0, 1, 2], [4], 0)]  # no penalty: untouched
    out = apply_penalties(logits.clone(), SamplingBatch.build(rows))
    assert out.tolist() == [[1.0, -2.0, 0.5, -1.0, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]]
    # Same as transformers' RepetitionPenaltyLogitsProcessor on prompt + output.
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    ref = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1, 3]]), logits[:1].clone())
    assert torch.equal(out[:1], ref)
    # A greedy row picks the argmax after the penalty: token 4 (3.0) vs token 0 (2.0 -> 1.0).
    rows = [(P(temperature=0, repetition_penalty=2.0), [4], [], 0)]
    assert Sampler()(logits[:1].clone(), SamplingBatch.build(rows)).token_ids == [0]


def test_presence_and_frequency_penalties_hand_computed():
    logits = torch.zeros(2, 5)
    rows = [(P(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), [0, 0, 0], [1, 1, 2, 1], 0),
            (P(temperature=0, presence_penalty=-1.0), [4], [3], 0)]
    out = apply_penalties(logits.clone(), SamplingBatch.build(rows))
    # row 0: prompt tokens are not penalized; token 1 seen 3x: -(0.5 + 0.75); token 2 once: -(0.5 + 0.25)
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]
    assert Sampler()(logits.clone(), SamplingBatch.build(rows)).token_ids[1] == 3


def test_all_penalties_then_sampling_row_alone_equals_in_batch():
    p = P(temperature=0.9, top_k=20, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, seed=11)
    target = (p, [1, 2, 3, 4], [5, 5, 6], 0)
    alone = sample(Sampler(), logits_for(5), [target])
    batch = sample(Sampler(), logits_for(1, 5), [(P(temperature=0), list(range(30)), [], 0), target])
    assert batch[1] == alone[0]


def test_logprobs_match_transformers_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 90, 120, 7], [64, 3, 9, 11, 200, 1]])
    with torch.no_grad():
        ref_logits = model(ids).logits[:, -1, :].float()
    ref = torch.log_softmax(ref_logits, dim=-1)
    rows = [  # logprobs are of the raw logits: penalties and temperature do not change them
        (P(temperature=0.7, repetition_penalty=1.5, presence_penalty=1.0, logprobs=5, seed=1), ids[0].tolist(), [3], 0),
        (P(temperature=0, logprobs=0), ids[1].tolist(), [], 0),
        (P(temperature=1.0), [1], [], 0),
    ]
    logits = torch.cat([ref_logits, ref_logits[:1]])
    out = Sampler()(logits.clone(), SamplingBatch.build(rows))
    assert out.token_ids[1] == ref_logits[1].argmax().item()
    lp0, lp1, lp2 = out.logprobs
    assert lp2 is None and lp1.top == []
    assert math.isclose(lp1.logprob, ref[1, out.token_ids[1]].item(), abs_tol=1e-4)
    assert math.isclose(lp0.logprob, ref[0, out.token_ids[0]].item(), abs_tol=1e-4)
    top = ref[0].topk(5)
    assert [t for t, _ in lp0.top] == top.indices.tolist()
    assert all(math.isclose(v, r, abs_tol=1e-4) for (_, v), r in zip(lp0.top, top.values.tolist()))
    # Greedy fast path reports the same numbers.
    fast = Sampler()(ref_logits[1:].clone(), SamplingBatch.build([(P(temperature=0, logprobs=3), [1], [], 0)]))
    assert fast.token_ids == [ref_logits[1].argmax().item()]
    assert [t for t, _ in fast.logprobs[0].top] == ref[1].topk(3).indices.tolist()


def test_large_vocab_batch_shapes():
    """Mixed everything on a realistic vocab: one token per row, all ids in range."""
    vocab = 49152
    params = [P(temperature=0), P(temperature=0.8, top_k=50), P(temperature=1.0, top_p=0.9, seed=1),
              P(temperature=1.0, min_p=0.05, logprobs=3), P(temperature=0.6, repetition_penalty=1.1, seed=2)]
    rows = [(p, list(range(100)), list(range(i)), 0) for i, p in enumerate(params)]
    logits = logits_for(*range(len(params)), vocab=vocab)
    out = Sampler()(logits.clone(), SamplingBatch.build(rows))
    assert len(out.token_ids) == 5 and all(0 <= t < vocab for t in out.token_ids)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert [r is None for r in out.logprobs] == [True, True, True, False, True]
