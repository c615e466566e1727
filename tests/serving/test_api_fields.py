"""No silently dropped fields (issue 18), on a fake replica handle: unknown top-level fields and OpenAI fields we
do not implement are 400s naming them; the cheap fields (logit_bias, max_completion_tokens, stop_token_ids,
priority, cache_salt, user, echo, stream_options.continuous_usage_stats) reach the engine request or the
response; /tokenize, /detokenize, /v1/models/{id}, /version."""
from __future__ import annotations

import json
import logging

import pytest

from replicas.engine.hashing import block_hashes, extra_key
from tests.fixtures.fake_replicas import expected_text, sse_events

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]
CHAT = [{"role": "user", "content": "hi"}]


def _error(r, status=400):
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
async def test_unknown_top_level_field_is_a_400_naming_it(make_api, path, body):
    _, handle, client = make_api()
    err = _error(await client.post(path, json={**body, "some_future_field": [1]}))
    assert err == {"message": "Unrecognized request argument supplied: some_future_field",
                   "type": "invalid_request_error", "param": "some_future_field", "code": "unknown_parameter"}
    assert handle.requests == []


@pytest.mark.parametrize("path,body,field,value", [
    ("/v1/chat/completions", {"messages": CHAT}, "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", {"messages": CHAT}, "functions", [{"name": "f"}]),
    ("/v1/chat/completions", {"messages": CHAT}, "modalities", ["text", "audio"]),
    ("/v1/chat/completions", {"messages": CHAT}, "store", True),
    ("/v1/completions", {"prompt": PROMPT}, "best_of", 3),
    ("/v1/completions", {"prompt": PROMPT}, "suffix", "tail"),
])
async def test_openai_field_we_do_not_implement_is_a_400(make_api, path, body, field, value):
    _, handle, client = make_api()
    err = _error(await client.post(path, json={**body, field: value}))
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    assert err["message"] == f"{field} is not supported by this server"
    assert handle.requests == []


async def test_values_that_ask_for_nothing_are_accepted(make_api):
    _, handle, client = make_api()
    r = await client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 2, "store": False, "modalities": ["text"], "service_tier": "auto",
        "metadata": None, "audio": None})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text
    assert len(handle.requests) == 2


async def test_cheap_fields_reach_the_engine_request(make_api):
    _, handle, client = make_api()
    r = await client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_completion_tokens": 3, "max_tokens": 9, "logit_bias": {"7": 5.5, "12": -100},
        "stop_token_ids": [4, 40], "priority": -3, "cache_salt": "tenant-a", "user": "u1"})
    assert r.status_code == 200, r.text
    req = handle.requests[0]
    assert req.sampling.max_tokens == 3  # max_completion_tokens wins over the deprecated max_tokens
    assert req.sampling.logit_bias == {7: 5.5, 12: -100.0} and req.sampling.stop_token_ids == [4, 40]
    assert req.priority == -3 and req.cache_salt == "tenant-a"
    # The salt is in every block hash the router computes (its index lookups and the engine's cache agree).
    assert req.block_hashes == block_hashes(req.prompt_token_ids, 4, extra_key("tiny", "tenant-a"))
    assert req.block_hashes != block_hashes(req.prompt_token_ids, 4, extra_key("tiny"))
    await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    plain = handle.requests[1]
    assert plain.priority == 0 and plain.cache_salt is None and plain.sampling.logit_bias is None
    assert plain.block_hashes == block_hashes(PROMPT, 4, extra_key("tiny"))


@pytest.mark.parametrize("field,value", [("logit_bias", {"100000": 1}), ("logit_bias", {"x": 1}),
                                         ("logit_bias", {"3": 101}), ("stop_token_ids", [100000]),
                                         ("cache_salt", "")])
async def test_bad_cheap_field_values_are_400s(make_api, field, value):
    _, handle, client = make_api()
    err = _error(await client.post("/v1/completions", json={"prompt": PROMPT, field: value}))
    assert err["param"] == field
    assert handle.requests == []


async def test_user_is_in_the_access_log(make_api, caplog):
    caplog.set_level(logging.INFO, logger="llm_cluster.access")
    _, _, client = make_api()
    await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "user": "alice"})
    await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_cluster.access"]
    assert lines[0]["user"] == "alice" and "user" not in lines[1]


async def test_echo_prepends_the_prompt(make_api):
    api, _, client = make_api()
    r = await client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 3, "echo": True})
    ids = api._preparer.tokenizer.encode("The quick")
    assert r.json()["choices"][0]["text"] == "The quick" + expected_text(ids, 0, 3)
    r = await client.post("/v1/completions", json={"prompt": [PROMPT, PROMPT[:4]], "max_tokens": 2, "n": 2,
                                                    "echo": True, "stream": True})
    events = sse_events(r.text)
    texts = {}
    for e in events:
        c = e["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    decode = api._preparer.tokenizer.decode
    assert texts[0] == decode(PROMPT) + expected_text(PROMPT, 0, 2)
    assert texts[3] == decode(PROMPT[:4]) + expected_text(PROMPT[:4], 1, 2)
    err = _error(await client.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 1}))
    assert err["param"] == "echo" and err["code"] == "unsupported_parameter"


async def test_continuous_usage_stats(make_api):
    _, _, client = make_api()
    r = await client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [e for e in sse_events(r.text) if e["choices"] and e["choices"][0]["delta"].get("role") is None]
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3]
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True})
    assert all(e.get("usage") is None for e in sse_events(r.text))


async def test_tokenize_detokenize_model_and_version(make_api):
    api, _, client = make_api()
    tok = api._preparer.tokenizer if api._preparer else None
    r = await client.post("/tokenize", json={"prompt": "The quick brown fox"})
    assert r.status_code == 200, r.text
    tok = api._preparer.tokenizer
    ids = tok.encode("The quick brown fox")
    assert r.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids}
    r = await client.post("/tokenize", json={"messages": CHAT})
    rendered = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert r.json()["tokens"] == rendered
    assert (await client.post("/detokenize", json={"tokens": ids})).json() == {"prompt": "The quick brown fox"}
    assert _error(await client.post("/detokenize", json={"tokens": [10**6]}))["param"] == "tokens"
    assert _error(await client.post("/tokenize", json={"prompt": "x", "extra": 1}))["param"] == "extra"
    card = (await client.get("/v1/models/tiny")).json()
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 128
    assert _error(await client.get("/v1/models/other"), 404)["code"] == "model_not_found"
    v = (await client.get("/version")).json()
    assert set(v) == {"version"} and v["version"]
