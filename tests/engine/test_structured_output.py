"""Structured outputs (issue 18): the token bitmask in the sampler, the engine's per-sequence grammar state
(JSON Schema and JSON object output that validates at temperature 0.7, with chunked prefill and mixed batches,
failover resume in the same grammar state with exact tokens), and the router's response_format mapping with
400s naming schema features the grammar cannot enforce."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from replicas.engine.protocol import EngineError, SamplingParams, StructuredOutput
from replicas.engine.sampler import Sampler, SamplingBatch, apply_token_bitmask
from tests.fixtures.engine import make_engine, random_prompts, request, run_all, text_of, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "ok"],
    "additionalProperties": False,
}


def _mask(rows: list[list[int] | None], vocab: int) -> torch.Tensor:
    """Bitmask rows allowing exactly the listed tokens (None: all)."""
    words = (vocab + 31) // 32
    out = torch.full((len(rows), words), -1, dtype=torch.int32)
    for i, allowed in enumerate(rows):
        if allowed is None:
            continue
        bits = [0] * (words * 32)
        for t in allowed:
            bits[t] = 1
        for w in range(words):
            v = sum(bits[w * 32 + b] << b for b in range(32))
            out[i, w] = v - (1 << 32) if v >= 1 << 31 else v
    return out


@pytest.mark.parametrize("gpu_path", [False, True])
def test_bitmask_masks_rows_in_the_sampler(gpu_path, monkeypatch):
    if gpu_path:  # the torch path CUDA takes, run on CPU tensors
        monkeypatch.setattr("replicas.engine.sampler._on_cpu", lambda t: False)
    V = 70
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    allowed = ([0, 2, 3], _mask([[3, 40], [], [65], [31, 32]], V))  # row 1 has no grammar
    rows = [(SamplingParams(temperature=0), [1], [], 0), (SamplingParams(temperature=0), [1], [], 0),
            (SamplingParams(temperature=1.0, seed=5), [1], [], 0), (SamplingParams(temperature=0.7), [1], [], 1)]
    for seed in range(20):
        out = Sampler(seed=seed)(logits.clone(), SamplingBatch.build(rows, allowed=allowed)).token_ids
        assert out[0] == (3 if logits[0, 3] > logits[0, 40] else 40)
        assert out[1] == int(logits[1].argmax())  # untouched
        assert out[2] == 65 and out[3] in (31, 32)
    # Logits past the tokenizer's span (a padded embedding) are never allowed for a constrained row.
    wide = torch.zeros(2, 80)
    apply_token_bitmask(wide, _mask([[1, 33], []], 64), torch.tensor([0]))
    assert (~torch.isinf(wide[0])).nonzero().view(-1).tolist() == [1, 33] and not torch.isinf(wide[1]).any()
    full = torch.zeros(1, 64)
    apply_token_bitmask(full, _mask([list(range(0, 64, 3))], 64))
    assert (~torch.isinf(full[0])).nonzero().view(-1).tolist() == list(range(0, 64, 3))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # A small step budget: prompts prefill in chunks, mixed with other rows' decodes.
    return make_engine(tiny_model_dir, max_num_batched_tokens=16, max_num_seqs=8)


def _sp(**kw) -> SamplingParams:
    kw.setdefault("structured", StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMA)))
    return SamplingParams(**{"max_tokens": 120, "temperature": 0.7, **kw})


def test_json_schema_output_validates_at_temperature(engine):
    prompts = random_prompts(8, 400, 5, 30, seed=3)
    reqs = [request(f"s{i}", p, _sp(n=2, seed=i)) for i, p in enumerate(prompts)]
    reqs += [request("plain", prompts[0], SamplingParams(max_tokens=10, temperature=0.7, ignore_eos=True))]
    out = run_all(engine, reqs)
    for r in reqs[:-1]:
        for i in range(2):
            chunks = [c for c in out[r.request_id] if c.index == i]
            assert chunks[-1].finish_reason == "stop", (r.request_id, text_of(chunks, i))
            jsonschema.validate(json.loads(text_of(out[r.request_id], i)), SCHEMA)
    assert len(tokens_of(out["plain"])) == 10  # an unconstrained row in the same batches is untouched


def test_json_object_and_ignore_eos(engine):
    # A random model may nest objects past any budget: a bias towards "}" closes them.
    close = engine.tokenizer.convert_tokens_to_ids("}")
    sp = _sp(structured=StructuredOutput(kind="json_object"), seed=1, ignore_eos=True, max_tokens=60,
             logit_bias={close: 4.0})
    out = run_all(engine, [request("o", random_prompts(1, 400, 8, 8, seed=4)[0], sp)])["o"]
    assert out[-1].finish_reason == "stop"  # the complete grammar ends the choice even with ignore_eos
    assert isinstance(json.loads(text_of(out)), dict) and out[-1].token_ids[-1] in engine.eos_token_ids


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_resume_continues_in_the_same_grammar_state(engine, temperature):
    prompt = random_prompts(1, 400, 10, 10, seed=5)[0]
    sp = _sp(seed=9, temperature=temperature)
    full = run_all(engine, [request("f", prompt, sp)])["f"]
    toks = tokens_of(full)
    k = len(toks) // 2
    resumed = run_all(engine, [request("r", prompt, sp, resume_token_ids=[toks[:k]])])["r"]
    assert toks[:k] + tokens_of(resumed) == toks  # tokens exact across the "failover"
    assert text_of(full).startswith(engine.tokenizer.decode(toks[:k])) and resumed[-1].finish_reason == "stop"
    # Resume tokens the grammar refuses are the router's bug or a forged request: an error, not garbage.
    bad = engine.tokenizer.encode("nope", add_special_tokens=False)
    with pytest.raises(EngineError):
        engine.add_request(request("bad", prompt, sp, resume_token_ids=[bad]))


def test_length_bounded_strings_refuse_raw_control_characters(engine):
    tok = engine.tokenizer
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}))
    prefix = tok.encode('{"a": "', add_special_tokens=False)
    control = tok.convert_tokens_to_ids("\u0111")  # the byte-level token of U+0011
    m = engine.grammars.matcher(spec, prefix)
    assert not m.accept(control)
    assert engine.grammars.matcher(spec, prefix).accept(tok.convert_tokens_to_ids("a"))


def test_schema_the_grammar_cannot_compile_is_an_engine_error(engine):
    sp = _sp(structured=StructuredOutput(kind="json_schema", json_schema='{"type": "object", "minProperties": 3}'))
    with pytest.raises(EngineError, match="cannot be compiled"):
        engine.add_request(request("x", [1, 2, 3], sp))
    assert not engine.has_unfinished()


# ---------------------------------------------------------------- router


async def test_response_format_reaches_the_engine_request(make_api):
    _, handle, client = make_api()
    msgs = [{"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}})
    assert r.status_code == 200, r.text
    st = handle.requests[0].sampling.structured
    assert st.kind == "json_schema" and json.loads(st.json_schema) == SCHEMA
    await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2,
                                                     "response_format": {"type": "json_object"}})
    assert handle.requests[1].sampling.structured == StructuredOutput(kind="json_object")
    await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2,
                                                     "response_format": {"type": "text"}})
    assert handle.requests[2].sampling.structured is None


async def test_schema_features_the_grammar_ignores_are_400s_naming_them(make_api):
    _, handle, client = make_api()
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                     "uniqueItems": True},
                                               "b": {"not": {"type": "string"}}}}
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and err["code"] == "unsupported_schema"
    assert "uniqueItems (at #/properties/a)" in err["message"] and "not (at #/properties/b)" in err["message"]
    assert handle.requests == []


async def test_failover_resubmits_the_response_format(make_api):
    from tests.fixtures.fake_replicas import FakeReplica

    _, handle, client = make_api([FakeReplica("a", die_after_chunks=3), FakeReplica("b")])
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}})
    assert r.status_code == 200
    first, resumed = handle.requests
    # The resumed attempt carries the same grammar and the tokens already sent: the engine replays them
    # through a fresh matcher (test_resume_continues_in_the_same_grammar_state).
    assert resumed.sampling.structured == first.sampling.structured is not None
    assert resumed.resume_token_ids and len(resumed.resume_token_ids[0]) == 3
