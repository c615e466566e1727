"""The embedded SmolLM2-135M-Instruct through our engine answers a simple question correctly, and matches
transformers greedy decoding token for token."""
from __future__ import annotations

import pytest

from tests.fixtures.engine import HFReference, greedy, make_engine, request, run_all, text_of, tokens_of

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


def test_json_schema_output_validates_with_smollm2(smollm2_dir):
    """Structured output on the real 49k-token vocabulary: n=4 choices at temperature 0.7 all validate."""
    import json

    import jsonschema

    from replicas.engine.protocol import SamplingParams, StructuredOutput

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                      "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0}}}
    engine = make_engine(smollm2_dir, block_size=16, num_kv_blocks=128)
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give the capital of France as JSON with city, country and population."}],
        add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    sp = SamplingParams(n=4, max_tokens=80, temperature=0.7, seed=1,
                        structured=StructuredOutput(kind="json_schema", json_schema=json.dumps(schema)))
    chunks = run_all(engine, [request("j", prompt, sp)])["j"]
    for i in range(4):
        assert [c.finish_reason for c in chunks if c.index == i][-1] == "stop"
        jsonschema.validate(json.loads(text_of(chunks, i)), schema)
