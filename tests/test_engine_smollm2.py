"""The embedded SmolLM2-135M-Instruct through our engine answers a simple question correctly, and matches
transformers greedy decoding token for token."""
from __future__ import annotations

import pytest

from tests.engine_utils import HFReference, greedy, make_engine, request, run_all, text_of, tokens_of

pytestmark = pytest.mark.slow


def test_capital_of_france(smollm2_dir):
    engine = make_engine(smollm2_dir, block_size=16, num_kv_blocks=64)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    chunks = run_all(engine, [request("q", prompt, greedy(20, ignore_eos=False))])["q"]
    assert "Paris" in text_of(chunks)
    assert chunks[-1].finish_reason == "stop"  # ended on <|im_end|>, not the length limit
    assert tokens_of(chunks)[:-1] == HFReference(smollm2_dir).generate(prompt, len(chunks))[:len(chunks) - 1]
