"""The routing benchmark's model: its answers come back through the chat template as the very tokens it
generated, so the engine's cached blocks of the previous answer serve the next turn (the tiny BPE model's
random answers re-tokenize differently and cap reuse at the previous prompt)."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from load_tests.bench_model import build_bench_model
from load_tests.routing_model import requests_of, working_set_blocks
from load_tests.workloads import Arrival, LengthDist, MultiTurnConfig, _words, generate
from tests.fixtures.engine import greedy, make_engine, request, run_all, text_of, tokens_of

BS = 16


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    return build_bench_model(tmp_path_factory.mktemp("bench-model"), hidden=64, layers=2)


def _encode(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)


def _two_turns(model_dir, seed: int = 0):
    """(turn 1 prompt + generated ids, turn 2 prompt ids, turn 2's cached prompt tokens) on one engine."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    engine = make_engine(model_dir, block_size=BS)
    rng = np.random.default_rng(seed)
    msgs = [{"role": "system", "content": "You are assistant 0. " + _words(rng, 30)},
            {"role": "user", "content": _words(rng, 40)}]
    p1 = _encode(tok, msgs)
    chunks = run_all(engine, [request("t1", p1, greedy(40))])["t1"]
    msgs += [{"role": "assistant", "content": text_of(chunks)}, {"role": "user", "content": _words(rng, 20)}]
    p2 = _encode(tok, msgs)
    second = run_all(engine, [request("t2", p2, greedy(1))])["t2"]
    return p1 + tokens_of(chunks), p2, second[-1].usage.cached_prompt_tokens


def test_answer_round_trips_and_next_turn_reuses_its_blocks(bench_model_dir):
    turn1, p2, cached = _two_turns(bench_model_dir)
    assert p2[:len(turn1)] == turn1  # the answer re-tokenized to exactly the generated ids
    # Every full block of prompt + answer is cached, except the one holding the last generated token
    # (its KV was never computed).
    assert cached == (len(turn1) - 1) // BS * BS
    assert cached > len(turn1) - 40  # well into the answer, not just the previous prompt


def test_tiny_bpe_model_answers_do_not_round_trip(tiny_model_dir):
    """Why the benchmark has its own model: with the BPE one, reuse stops near the previous prompt's end."""
    turn1, p2, cached = _two_turns(tiny_model_dir)
    assert p2[:len(turn1)] != turn1
    assert cached < len(turn1) - 2 * BS


def test_working_set_counts_each_conversations_final_context(bench_model_dir):
    tok = AutoTokenizer.from_pretrained(str(bench_model_dir))
    cfg = dict(seed=1, system_prompt_tokens=20, max_tokens=10, arrival=Arrival(concurrency=1),
               user_tokens=LengthDist(median=30))
    one = generate(MultiTurnConfig(conversations=1, turns=1, **cfg))
    [spec] = one.requests
    prompt = _encode(tok, [m.model_dump(include={"role", "content"}) for m in spec.messages])
    assert working_set_blocks(requests_of(one, tok), BS) == -(-(len(prompt) + 10) // BS)
    # Three turns: the last turn's context holds two earlier answers of max_tokens words (one token each),
    # every message costs 3 template tokens (<|im_start|>, role, <|im_end|>), the generation prompt 2.
    three = generate(MultiTurnConfig(conversations=1, turns=3, **cfg))
    last = three.requests[-1]
    words = sum(len(m.content.split()) for m in last.messages if m.answer_of is None)
    blocks = working_set_blocks(requests_of(three, tok), BS)
    assert blocks == -(-(words + 2 * 10 + 3 * len(last.messages) + 2 + 10) // BS)
    # Conversations add up.
    three_conversations = requests_of(generate(MultiTurnConfig(conversations=3, turns=3, **cfg)), tok)
    assert working_set_blocks(three_conversations, BS) > 2 * blocks
