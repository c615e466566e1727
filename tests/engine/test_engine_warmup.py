"""Engine warm-up: a built engine has already run prefill, a prefix hit, decode batches and the sampler's stages,
and shows none of it: nothing in use or cached, no KV event published, counters at zero, outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.model_runner import ModelRunner
from replicas.engine.protocol import SamplingParams
from replicas.engine.sampler import Sampler
from tests.fixtures.engine import greedy, make_engine, request, run_all, tokens_of


class _Spy:
    """Records each forward (per sequence: tokens already computed, tokens this step) and each sampled batch."""

    def __init__(self, monkeypatch):
        self.steps: list[list[tuple[int, int]]] = []
        self.batches = []
        run, call = ModelRunner.run, Sampler.__call__

        def spy_run(runner, seqs, num_tokens):
            self.steps.append([(s.num_computed_tokens, n) for s, n in zip(seqs, num_tokens)])
            return run(runner, seqs, num_tokens)

        def spy_sample(sampler, logits, batch):
            self.batches.append(batch)
            return call(sampler, logits, batch)
        monkeypatch.setattr(ModelRunner, "run", spy_run)
        monkeypatch.setattr(Sampler, "__call__", spy_sample)


def test_warmup_ran_prefill_prefix_hit_decode_batches_and_sampling(tiny_model_dir, monkeypatch):
    spy = _Spy(monkeypatch)
    engine = make_engine(tiny_model_dir)
    bs = engine.block_size
    fresh_prefills = [n for step in spy.steps for start, n in step if start == 0 and n > 1]
    hits = [(start, n) for step in spy.steps for start, n in step if start > 0 and n > 1]
    decode_batches = {len(step) for step in spy.steps if all(n == 1 for _, n in step)}
    assert fresh_prefills and max(fresh_prefills) > 2 * bs, spy.steps
    assert hits and all(start % bs == 0 for start, _ in hits), spy.steps  # a prompt resumed after cached blocks
    assert 1 in decode_batches and max(decode_batches) > 1, spy.steps
    assert any(not b.greedy_only for b in spy.batches) and any(b.max_logprobs >= 0 for b in spy.batches)
    assert any(b.repetition is not None for b in spy.batches)
    assert engine.stats().steps == 0


def test_warmup_leaves_no_trace(tiny_model_dir):
    stored, evicted = [], []
    engine = make_engine(tiny_model_dir, on_blocks_stored=stored.extend, on_blocks_evicted=evicted.extend)
    s = engine.stats()
    assert (s.num_waiting, s.num_running, s.pending_prefill_tokens) == (0, 0, 0)
    assert s.kv_blocks_free == s.kv_blocks_total and s.kv_usage == 0.0
    assert (s.prefix_query_tokens, s.prefix_hit_tokens, s.num_preemptions, s.computed_tokens, s.steps) == (0,) * 5
    assert s.last_step_unix is None
    assert stored == [] and evicted == [], "warm-up blocks were published to the prefix index"
    assert engine.block_manager.cached == {} and not engine.requests and not engine.take_failures()
    # The hooks are back on: a real request's blocks are published, and it finds no warm-up block cached.
    run_all(engine, [request("a", range(3, 3 + 4 * engine.block_size + 1), greedy(2))])
    assert stored and engine.stats().prefix_hit_tokens == 0


def test_warmup_changes_no_output(tiny_model_dir):
    """Same tokens warm or cold, unseeded sampling too: the sampler's generator starts from the seed again."""
    reqs = lambda: [request("g", range(5, 30), greedy(6)),  # noqa: E731
                    request("s", range(7, 19), SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True))]
    cold = run_all(make_engine(tiny_model_dir, warmup=False), reqs())
    warm = run_all(make_engine(tiny_model_dir), reqs())
    assert {k: tokens_of(v) for k, v in warm.items()} == {k: tokens_of(v) for k, v in cold.items()}


def test_warmup_off_runs_nothing(tiny_model_dir, monkeypatch):
    spy = _Spy(monkeypatch)
    make_engine(tiny_model_dir, warmup=False)
    assert spy.steps == []


@pytest.mark.parametrize("kw", [dict(num_kv_blocks=2, block_size=1), dict(num_kv_blocks=3, block_size=4),
                                dict(max_model_len=16, block_size=16, num_kv_blocks=4),
                                dict(max_num_seqs=1, max_num_batched_tokens=4), dict(enable_prefix_caching=False)])
def test_warmup_fits_small_engines(tiny_model_dir, kw):
    engine = make_engine(tiny_model_dir, **kw)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    run_all(engine, [request("a", [5], greedy(1))])


def test_gpu_warmup_plan_covers_eager_steps_split_counts_and_every_decode_batch(tiny_model_dir, monkeypatch):
    """The plan a CUDA engine runs (the device patched), each phase after the last: a prompt past the token budget
    and 4096 tokens (full chunks, then a remainder of no graph's size), a prefix hit, single requests over cached
    prefixes of 0 to 4096 tokens (each split count of the attention kernel), then decode batches shrinking from
    min(max_num_seqs, 64) to 1."""
    engine = make_engine(tiny_model_dir, warmup=False, num_kv_blocks=4096, block_size=16,
                         max_num_batched_tokens=512, max_num_seqs=24)
    monkeypatch.setattr(engine.runner, "device", torch.device("cuda"))
    phases = engine._warmup_phases()
    [long] = phases[0]
    assert len(long.prompt_token_ids) == min(4096 + 300, engine.max_model_len - 2)
    [hit] = phases[1]
    cached = (len(long.prompt_token_ids) - 1) // 16 * 16
    assert hit.prompt_token_ids[:cached] == long.prompt_token_ids[:cached] and len(hit.prompt_token_ids) > cached
    [structured] = phases[-1]  # last and alone: a tokenizer the grammar cannot constrain fails only this row
    assert structured.sampling.structured is not None
    sweep = [p for p in phases[2:-2]]
    assert all(len(p) == 1 for p in sweep)  # alone: a batch-1 decode at that context
    contexts = {}
    for [r] in sweep:
        ids = r.prompt_token_ids
        shared = next((i for i, (a, b) in enumerate(zip(ids, long.prompt_token_ids)) if a != b), len(ids))
        contexts.setdefault(shared // 16 * 16, set()).add(len(ids) - shared // 16 * 16)
    assert set(contexts) == {0, 256, 512, 1024, 2048}  # 4096 + 300 exceeds this model's 4096 positions
    assert all(new == {300, 600} for new in contexts.values())
    decode = phases[-2]
    assert sorted(r.sampling.max_tokens for r in decode) == list(range(1, 25))
    assert len({tuple(r.prompt_token_ids) for r in decode}) == 24  # no prefix hits among them
    # Sized to the context and the pool.
    short = make_engine(tiny_model_dir, warmup=False, num_kv_blocks=40, block_size=16, max_model_len=600)
    monkeypatch.setattr(short.runner, "device", torch.device("cuda"))
    phases = short._warmup_phases()
    assert all(len(r.prompt_token_ids) + r.sampling.max_tokens <= 600 for p in phases for r in p)
    assert sum(short.block_manager.blocks_needed(len(r.prompt_token_ids) + r.sampling.max_tokens)
               for r in phases[-1]) <= 40


def test_warmup_failure_fails_the_engine(tiny_model_dir, monkeypatch):
    def broken(runner, seqs, num_tokens):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(ModelRunner, "run", broken)
    with pytest.raises(RuntimeError, match="warm-up.*kernel exploded"):
        make_engine(tiny_model_dir)
