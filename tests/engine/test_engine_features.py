"""LLMEngine behaviours beyond greedy parity: stop conditions, n > 1, logprobs, seeded sampling, failover
resume, validation, abort, block-event hooks, failure containment, no leaks."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.detokenizer import token_texts
from replicas.engine.hashing import block_hashes, extra_key
from replicas.engine.protocol import EngineError, SamplingParams
from tests.fixtures.engine import (
    HFReference,
    greedy,
    make_engine,
    random_prompts,
    request,
    run_all,
    text_of,
    tokens_of,
)


@pytest.fixture
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt(tiny_model_dir):
    return random_prompts(1, 400, 12, 12, seed=11)[0]


def _free_all(engine):
    s = engine.stats()
    return s.kv_blocks_free == s.kv_blocks_total and all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_length_finish_and_usage(engine, prompt):
    chunks = run_all(engine, [request("a", prompt, greedy(6))])["a"]
    assert len(tokens_of(chunks)) == 6
    assert [c.finish_reason for c in chunks] == [None] * 5 + ["length"]
    assert [c.usage is not None for c in chunks] == [False] * 5 + [True]
    assert chunks[-1].usage.model_dump() == {"prompt_tokens": 12, "completion_tokens": 6, "cached_prompt_tokens": 0}
    assert text_of(chunks) == engine.tokenizer.decode(tokens_of(chunks), skip_special_tokens=True)
    assert _free_all(engine)


def test_stop_string_cuts_text(engine, prompt):
    full = run_all(engine, [request("a", prompt, greedy(16))])["a"]
    text = text_of(full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.index(stop)
    out = run_all(engine, [request("b", prompt, greedy(16, stop=[stop]))])["b"]
    assert text_of(out) == text[:cut] and out[-1].finish_reason == "stop"
    inc = run_all(engine, [request("c", prompt, greedy(16, stop=[stop], include_stop_str_in_output=True))])["c"]
    assert text_of(inc) == text[:cut + len(stop)]
    assert _free_all(engine)


def test_stop_token_ids_and_eos(engine, prompt):
    full = tokens_of(run_all(engine, [request("a", prompt, greedy(10))])["a"])
    stop_tok = full[3]
    first = full.index(stop_tok)
    out = run_all(engine, [request("b", prompt, greedy(10, stop_token_ids=[stop_tok]))])["b"]
    assert tokens_of(out) == full[:first + 1] and out[-1].finish_reason == "stop"
    engine.eos_token_ids = frozenset({stop_tok})
    eos = run_all(engine, [request("c", prompt, SamplingParams(max_tokens=10, temperature=0))])["c"]
    assert tokens_of(eos) == full[:first + 1] and eos[-1].finish_reason == "stop"
    assert eos[-1].text == ""  # the eos token's text is not output
    ignored = run_all(engine, [request("d", prompt, greedy(10))])["d"]  # greedy() sets ignore_eos
    assert tokens_of(ignored) == full


def test_n_choices_share_prompt_blocks(engine, prompt):
    sp = SamplingParams(n=3, max_tokens=5, temperature=0.0, ignore_eos=True)
    chunks = run_all(engine, [request("a", prompt, sp)])["a"]
    outs = [tokens_of(chunks, i) for i in range(3)]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 5
    # 12 prompt tokens = 3 full blocks of 4, of which 2 are hit (the last token's block is computed):
    # choices 1 and 2 reuse choice 0's blocks.
    assert engine.stats().prefix_hit_tokens == 2 * 8
    finals = [c for c in chunks if c.finish_reason]
    assert sorted(c.index for c in finals) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 15 and sum(c.usage is not None for c in chunks) == 1
    assert _free_all(engine)


def test_seeded_sampling_reproducible_and_choices_differ(engine, prompt):
    sp = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=1234)
    a = run_all(engine, [request("a", prompt, sp)])["a"]
    b = run_all(engine, [request("b", prompt, sp), request("noise", prompt[:5], SamplingParams(max_tokens=9))])["b"]
    assert tokens_of(a, 0) == tokens_of(b, 0) and tokens_of(a, 1) == tokens_of(b, 1)
    assert tokens_of(a, 0) != tokens_of(a, 1)


@pytest.mark.parametrize("sampling", [greedy(12), SamplingParams(max_tokens=12, temperature=1.0, seed=7,
                                                                  ignore_eos=True)])
def test_resume_continues_the_stream(engine, prompt, sampling):
    full = run_all(engine, [request("a", prompt, sampling)])["a"]
    toks = tokens_of(full)
    sent = 5
    resumed = run_all(engine, [request("b", prompt, sampling, resume_token_ids=[toks[:sent]])])["b"]
    assert tokens_of(resumed) == toks[sent:]
    # The client saw the first 5 chunks' text from the old replica; the new one continues exactly there.
    assert text_of(resumed) == "".join(c.text for c in full[sent:])
    assert resumed[-1].usage.completion_tokens == 12 and resumed[-1].finish_reason == "length"


def test_logprobs_match_reference(tiny_model_dir, engine, prompt):
    chunks = run_all(engine, [request("a", prompt, greedy(3, logprobs=4))])["a"]
    toks = tokens_of(chunks)
    ref = HFReference(tiny_model_dir).logits(prompt + toks[:2]).log_softmax(-1)[len(prompt) - 1:]
    for i, c in enumerate(chunks):
        (lp,) = c.logprobs
        assert lp.token_id == toks[i] and lp.token == token_texts(engine.tokenizer, [toks[i]])[0]
        assert abs(lp.logprob - ref[i, toks[i]].item()) < 1e-4
        top = ref[i].topk(4)
        assert [t for t, _, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, _, v), r in zip(lp.top, top.values.tolist())) < 1e-4
    plain = run_all(engine, [request("b", prompt, greedy(3))])["b"]
    assert all(c.logprobs is None for c in plain)


def test_validation_errors(engine, prompt):
    limit = engine.max_model_len
    cases = {
        "context": request("x1", [5] * (limit - 3), greedy(4)),
        "in \\[0": request("x2", [engine.vocab_size + 1], greedy(4)),
        "resume": request("x3", prompt, greedy(4), resume_token_ids=[[5, 6, 7, 8]]),
    }
    for message, req in cases.items():
        with pytest.raises(EngineError, match=message):
            engine.add_request(req)
    engine.add_request(request("dup", prompt))
    with pytest.raises(EngineError, match="already running"):
        engine.add_request(request("dup", prompt))
    assert engine.abort_request("dup")[-1].finish_reason == "abort"
    assert not engine.has_unfinished() and _free_all(engine)


def test_request_larger_than_pool_fails_alone(tiny_model_dir, prompt):
    engine = make_engine(tiny_model_dir, num_kv_blocks=8)  # 32 tokens
    with pytest.raises(EngineError, match="KV blocks"):
        engine.add_request(request("big", prompt, greedy(30)))
    assert tokens_of(run_all(engine, [request("ok", prompt, greedy(8))])["ok"])


def test_abort_frees_blocks_at_once(engine, prompt):
    engine.add_request(request("a", prompt, greedy(50)))
    engine.add_request(request("b", prompt[:7], greedy(50)))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
    closing = engine.abort_request("a")
    assert [c.finish_reason for c in closing] == ["abort"] and closing[-1].usage.completion_tokens == 3
    assert engine.abort_request("a") == []
    engine.abort_request("b")
    assert not engine.has_unfinished() and _free_all(engine)


def test_block_hooks_get_the_kvstore_hashes(tiny_model_dir, prompt):
    stored, evicted = [], []
    engine = make_engine(tiny_model_dir, num_kv_blocks=6, on_blocks_stored=stored.extend,
                         on_blocks_evicted=evicted.extend)
    run_all(engine, [request("a", prompt, greedy(4))])
    # 12 prompt + 3 fed-back output tokens: 3 full blocks, hashed over prompt and output alike.
    toks = prompt + tokens_of(engine_chunks := run_all(engine, [request("b", prompt, greedy(4))])["b"])
    expect = block_hashes(toks[:15], 4, extra_key(engine.model_id))
    assert stored == expect and evicted == []
    assert engine_chunks[-1].usage.cached_prompt_tokens == 8
    other = random_prompts(1, 400, 20, 20, seed=12)[0]
    run_all(engine, [request("c", other, greedy(1))])  # needs 5 of 6 blocks: evicts cached ones
    assert len(evicted) >= 2 and set(evicted) <= set(expect)


def test_forward_failure_fails_the_batch_and_engine_keeps_serving(engine, prompt, monkeypatch):
    engine.add_request(request("a", prompt, greedy(4)))
    engine.add_request(request("b", prompt[:6], greedy(4)))
    real = engine.runner.model.forward
    monkeypatch.setattr(engine.runner.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert engine.step() == []
    failures = dict(engine.take_failures())
    assert set(failures) == {"a", "b"} and str(failures["a"]) == "boom"
    assert not engine.has_unfinished() and _free_all(engine)
    # Blocks the failed step registered are gone from the cache (their KV was never written).
    assert engine.block_manager.lookup(_seq(prompt)) == []
    monkeypatch.setattr(engine.runner.model, "forward", real)
    assert len(tokens_of(run_all(engine, [request("c", prompt, greedy(4))])["c"])) == 4


def _seq(tokens):
    from replicas.engine.sequence import Sequence
    return Sequence("probe", 0, tokens, SamplingParams())


def test_mixed_finish_abort_preempt_leaves_no_leak(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=24)
    prompts = random_prompts(10, engine.vocab_size, 8, 30, seed=13)
    for i, p in enumerate(prompts):
        engine.add_request(request(i, p, greedy(12) if i % 3 else SamplingParams(n=2, max_tokens=10, seed=i)))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps in (4, 9):
            engine.abort_request(str(steps))
    assert engine.stats().num_preemptions > 0
    assert _free_all(engine)
    assert torch.equal(torch.tensor(sorted(engine.block_manager.free)), torch.arange(20))


def test_error_in_one_request_fails_it_alone(engine, prompt):
    engine.add_request(request("bad", prompt, SamplingParams(n=2, max_tokens=4, temperature=0.0, ignore_eos=True)))
    engine.add_request(request("good", prompt[:9], greedy(4)))
    engine.step()  # prefill; each choice has sampled its first token

    def broken(token_ids):
        raise ValueError("detokenizer bug")
    for c in engine.requests["bad"].choices:
        c.detok.append = broken
    chunks = []
    while engine.has_unfinished():
        chunks += engine.step()
    failures = engine.take_failures()
    assert [(rid, str(e)) for rid, e in failures] == [("bad", "detokenizer bug")]
    assert {c.request_id for c in chunks} == {"good"} and chunks[-1].usage.completion_tokens == 4
    assert _free_all(engine)


def test_logit_bias_steers_greedy_and_sampled_rows(engine, prompt):
    full = tokens_of(run_all(engine, [request("a", prompt, greedy(6))])["a"])
    target = next(t for t in range(5, 300) if t not in full)
    biased = run_all(engine, [request("b", prompt, greedy(6, logit_bias={target: 100.0})),
                              request("c", prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                                  ignore_eos=True, logit_bias={target: 100.0})),
                              request("d", prompt, greedy(6, logit_bias={full[0]: -100.0}))])
    assert tokens_of(biased["b"]) == [target] * 6 and tokens_of(biased["c"]) == [target] * 6
    assert tokens_of(biased["d"])[0] != full[0]
    with pytest.raises(EngineError):
        engine.add_request(request("e", prompt, greedy(2, logit_bias={10**6: 1.0})))


def test_cache_salt_separates_prefix_caches(engine, prompt):
    long = prompt * 3
    run_all(engine, [request("a", long, greedy(2))])
    same = run_all(engine, [request("b", long, greedy(2))])["b"][-1].usage.cached_prompt_tokens
    salted = run_all(engine, [request("c", long, greedy(2), cache_salt="tenant-1")])["c"][-1].usage
    again = run_all(engine, [request("d", long, greedy(2), cache_salt="tenant-1")])["d"][-1].usage
    other = run_all(engine, [request("e", long, greedy(2), cache_salt="tenant-2")])["e"][-1].usage
    assert same > 0 and salted.cached_prompt_tokens == 0 and again.cached_prompt_tokens == same
    assert other.cached_prompt_tokens == 0
    # The engine caches under the hashes the router computes for that salt (replicas.engine.hashing, one function).
    assert set(block_hashes(long, 4, extra_key(engine.model_id, "tenant-1"))) <= set(engine.block_manager.cached)


def test_priority_runs_lower_values_first(tiny_model_dir, prompt):
    eng = make_engine(tiny_model_dir, max_num_seqs=1)
    order = []
    reqs = [request("late", prompt, greedy(2), priority=5), request("urgent", prompt, greedy(2), priority=-1),
            request("normal", prompt, greedy(2))]
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        order += [c.request_id for c in eng.step() if c.finish_reason]
    assert order == ["urgent", "normal", "late"]
