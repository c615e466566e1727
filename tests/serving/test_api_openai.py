"""OpenAI wire format on a fake replica handle: completions and chat, streaming (SSE, include_usage, n > 1
interleaving), logprobs, usage, parameter mapping, block hashes, models, metrics, access log."""
from __future__ import annotations

import json
import logging

from replicas.engine.hashing import block_hashes, extra_key
from tests.fixtures.fake_replicas import FakeReplica, expected_text, metric_value, sse_events, token_at

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


async def test_completion_response_and_usage(make_api):
    _, handle, client = make_api([FakeReplica("r0", cached_prompt_tokens=4)])
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": expected_text(PROMPT, 0, 5), "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    req = handle.requests[0]
    assert req.prompt_token_ids == PROMPT and req.sampling.max_tokens == 5
    # Router-side block hashes: full blocks of 4 only, with the model's extra key.
    assert req.block_hashes == block_hashes(PROMPT, 4, extra_key("tiny")) and len(req.block_hashes) == 2


async def test_completion_default_max_tokens_and_text_prompt(make_api):
    api, handle, client = make_api()
    r = await client.post("/v1/completions", json={"prompt": "The quick brown fox"})
    assert r.status_code == 200
    ids = api._preparer.tokenizer.encode("The quick brown fox")
    assert handle.requests[0].prompt_token_ids == ids
    assert handle.requests[0].sampling.max_tokens == 16
    assert r.json()["choices"][0]["text"] == expected_text(ids, 0, 16)


async def test_completion_prompt_shapes_map_to_choice_indices(make_api):
    _, handle, client = make_api()
    p1, p2 = [1, 2, 3], [4, 5, 6, 7]
    r = await client.post("/v1/completions", json={"prompt": [p1, p2], "n": 2, "max_tokens": 3, "seed": 9})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts == [expected_text(p1, 0, 3, 9), expected_text(p1, 1, 3, 9),
                     expected_text(p2, 0, 3, 9), expected_text(p2, 1, 3, 9)]
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 12
    assert sorted(len(q.prompt_token_ids) for q in handle.requests) == [3, 4]
    assert len({q.request_id for q in handle.requests}) == 2
    r = await client.post("/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 1})
    assert len(r.json()["choices"]) == 2


async def test_chat_response_uses_chat_template(make_api):
    api, handle, client = make_api()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": " of France?"}]}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    tok = api._preparer.tokenizer
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" \
               "<|im_start|>assistant\n"
    ids = tok.encode(rendered, add_special_tokens=False)
    assert handle.requests[0].prompt_token_ids == ids
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected_text(ids, 0, 4)}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 4


async def test_chat_default_max_tokens_is_rest_of_context(make_api):
    _, handle, client = make_api()  # context 128
    await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    req = handle.requests[0]
    assert req.sampling.max_tokens == 128 - len(req.prompt_token_ids)


async def test_sampling_parameters_mapping(make_api):
    _, handle, client = make_api()
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
        "max_tokens": 3, "temperature": 0, "top_p": 0.5, "stop": "END", "seed": 7, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True,
        "user": "u1"})
    assert r.status_code == 200, r.text
    s = handle.requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed, s.presence_penalty, s.frequency_penalty,
            s.top_k, s.min_p, s.repetition_penalty, s.ignore_eos, s.logprobs) == \
           (3, 0.0, 0.5, ["END"], 7, 0.5, -0.5, 5, 0.1, 1.2, True, None)
    await client.post("/v1/completions", json={"prompt": [1, 2], "stop": ["a", "b"], "temperature": None,
                                                "max_tokens": 1})
    s = handle.requests[1].sampling
    assert s.stop == ["a", "b"] and s.temperature == 1.0 and s.top_k == -1


async def test_completion_stream_sse_and_include_usage(make_api):
    _, _, client = make_api()
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"]
    events = sse_events(r.text)
    text_events, usage_event = events[:-1], events[-1]
    assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in text_events)
    assert "".join(e["choices"][0]["text"] for e in text_events) == expected_text(PROMPT, 0, 4)
    assert [e["choices"][0]["finish_reason"] for e in text_events] == [None, None, None, "length"]
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == 4
    assert usage_event["usage"]["prompt_tokens"] == 9 and usage_event["usage"]["total_tokens"] == 13
    assert len({e["id"] for e in events}) == 1
    # Without include_usage there is no usage event.
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert all(e["choices"] for e in sse_events(r.text))


async def test_chat_stream_n2_interleaves_by_index(make_api):
    _, _, client = make_api()
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    # Both choices open with the assistant role, then tokens interleave 0,1,0,1,...
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]["role"]) for e in events[:2]] == \
           [(0, "assistant"), (1, "assistant")]
    body = events[2:-1]
    assert [e["choices"][0]["index"] for e in body] == [0, 1, 0, 1, 0, 1]
    texts = {i: "".join(e["choices"][0]["delta"]["content"] for e in body if e["choices"][0]["index"] == i)
             for i in (0, 1)}
    assert texts[0] != texts[1] and all(t.count("<") == 3 for t in texts.values())
    assert [e["choices"][0]["finish_reason"] for e in body][-2:] == ["length", "length"]
    assert events[-1]["usage"]["completion_tokens"] == 6


async def test_completion_logprobs_format(make_api):
    _, handle, client = make_api()
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    toks = [token_at(PROMPT, 0, j) for j in range(3)]
    assert lp["tokens"] == [f"<{t}>" for t in toks]
    assert lp["token_logprobs"] == [-0.5] * 3
    assert lp["top_logprobs"][0] == {f"<{toks[0]}>": -0.5, f"<{toks[0] + 1}>": -1.5}
    assert lp["text_offset"] == [0, len(f"<{toks[0]}>"), len(f"<{toks[0]}><{toks[1]}>")]
    assert handle.requests[0].sampling.logprobs == 2
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logprobs": 1,
                                                    "stream": True})
    events = sse_events(r.text)
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events] == [[0], [len(f"<{toks[0]}>")]]


async def test_chat_logprobs_format(make_api):
    _, handle, client = make_api()
    msgs = [{"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "logprobs": True,
                                                         "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    first = content[0]
    assert first["logprob"] == -0.5 and first["bytes"] == list(first["token"].encode())
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.5]
    assert handle.requests[0].sampling.logprobs == 2
    await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "logprobs": True})
    assert handle.requests[1].sampling.logprobs == 0
    r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "top_logprobs": 3})
    assert handle.requests[2].sampling.logprobs is None and r.json()["choices"][0]["logprobs"] is None


async def test_models_health_metrics(make_api):
    _, _, client = make_api()
    r = await client.get("/v1/models")
    assert r.json()["object"] == "list" and r.json()["data"][0]["id"] == "tiny"
    assert r.json()["data"][0]["max_model_len"] == 128
    assert (await client.get("/health")).json() == {"status": "ok"}
    await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    await client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 9})
    await client.post("/v1/completions", json={"prompt": PROMPT}, headers={"content-length": "99999999"})
    m = (await client.get("/metrics")).text
    v = lambda sample: metric_value(m, sample)  # noqa: E731
    assert v('llmc_requests_total{model="tiny",status="ok"}') == 2  # /v1/models and the completion
    assert v('llmc_requests_total{model="tiny",status="bad_request"}') == 1
    assert v('llmc_requests_total{model="tiny",status="too_large"}') == 1
    assert v('llmc_time_to_first_token_seconds_count{model="tiny"}') == 1
    assert v('llmc_inter_token_latency_seconds_count{model="tiny"}') == 2
    assert v('llmc_e2e_request_latency_seconds_count{model="tiny"}') == 1
    assert v('llmc_generation_tokens_total{model="tiny"}') == 3 and v('llmc_prompt_tokens_total{model="tiny"}') == 9
    assert 'llmc_router_queued_requests{model="tiny"} 0.0' in m
    assert 'llmc_router_in_flight_requests{model="tiny"} 0.0' in m
    assert "llmc_failovers_total" in m and "llmc_request_retries_total" in m
    assert (await client.get("/openapi.json")).json()["paths"]["/v1/chat/completions"]


async def test_access_log_line(make_api, caplog):
    caplog.set_level(logging.INFO, logger="llm_cluster.access")
    _, _, client = make_api()
    await client.post("/v1/chat/completions", headers={"x-request-id": "log-1"},
                      json={"messages": [{"role": "user", "content": "top secret words"}], "max_tokens": 2})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_cluster.access"]
    line = next(x for x in lines if x["request_id"] == "log-1")
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions" and line["status"] == 200
    assert line["completion_tokens"] == 2 and line["prompt_tokens"] > 0 and line["latency_ms"] > 0
    assert "secret" not in json.dumps(lines)


async def test_duplicate_client_request_ids_get_distinct_engine_ids(make_api):
    import asyncio

    _, handle, client = make_api([FakeReplica("r", delay_s=0.01)])
    rs = await asyncio.gather(*[client.post("/v1/completions", headers={"x-request-id": "same"},
                                            json={"prompt": PROMPT, "max_tokens": 3}) for _ in range(3)])
    assert all(r.status_code == 200 and r.headers["x-request-id"] == "same" for r in rs)
    ids = [q.request_id for q in handle.requests]
    assert len(set(ids)) == 3 and "same" in ids


async def test_router_bug_mid_stream_ends_with_error_event(make_api, monkeypatch):
    from router.responses import CompletionFormatter

    def broken(self, index, chunk):
        raise RuntimeError("formatter bug")

    monkeypatch.setattr(CompletionFormatter, "_event", broken)
    _, handle, client = make_api()
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    event = json.loads(r.text.split("\n\n")[0][6:])
    assert event["error"]["type"] == "internal_error"
    assert handle.streams[0].cancelled or handle.replicas[0].active == 0
