"""Tool calling (issue 18): the parsers of the families we serve, tool_choice modes (prompt rendering, the grammar
the output is constrained to, 400s), history with assistant tool calls and tool results, and the chat formatter
turning output into `message.tool_calls` / streamed `tool_calls` deltas with finish_reason "tool_calls"."""
from __future__ import annotations

import json

import pytest

from replicas.engine.protocol import GenerationChunk
from router.responses import ChatFormatter
from router.tools import ToolMode, detect_format, may_start_call, parse
from tests.fixtures.fake_replicas import sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("fmt,text,content,calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
     '{"x": 1}}</tool_call>', None, [("a", {}), ("b", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"k": "v"}}', None, [("a", {"k": "v"})]),  # EOS before close
    ("hermes", "no call here", "no call here", []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}', None,
     [("a", {}), ("b", {"y": 2})]),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]', None,
     [("get_weather", {"city": "Rome"})]),
    ("mistral", '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"z": 3}}]', None,  # marker skipped
     [("a", {}), ("b", {"z": 3})]),
    ("mistral", "Plain answer", "Plain answer", []),
])
def test_parsers(fmt, text, content, calls):
    got_content, got = parse(fmt, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)


def test_streaming_holds_back_what_may_start_a_call():
    assert may_start_call("hermes", "Hello <tool") == 6 and may_start_call("hermes", "Hello") == 5
    assert may_start_call("hermes", "a <tool_call>{") == 2
    assert may_start_call("mistral", "x [TOOL_") == 2 and may_start_call("llama3_json", ' {"name"') == 0


def test_format_detection(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert detect_format(tok) == "hermes"  # a template without tools: we describe them in Hermes form
    tok.chat_template = "{{ '<|python_tag|>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert detect_format(tok) == "llama3_json"
    tok.chat_template = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
    assert detect_format(tok) == "mistral"


# ---------------------------------------------------------------- requests


async def test_auto_renders_tools_and_none_does_not(make_api):
    api, handle, client = make_api(handle_kw={"max_model_len": 4096})
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 200, r.text
    tok = api._preparer.tokenizer
    prompt = tok.decode(handle.requests[0].prompt_token_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt and handle.requests[0].sampling.structured is None
    await client.post("/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER], "tool_choice": "none",
                                                     "max_tokens": 2})
    assert "<tools>" not in tok.decode(handle.requests[1].prompt_token_ids)


async def test_named_and_required_constrain_the_output(make_api):
    _, handle, client = make_api(handle_kw={"max_model_len": 4096})
    r = await client.post("/v1/chat/completions", json={
        "messages": MSGS, "tools": [WEATHER, TIME], "max_tokens": 2,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert r.status_code == 200, r.text
    st = handle.requests[0].sampling.structured
    assert st.kind == "json_schema" and json.loads(st.json_schema) == WEATHER["function"]["parameters"]
    await client.post("/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER, TIME], "max_tokens": 2,
                                                     "tool_choice": "required", "parallel_tool_calls": False})
    schema = json.loads(handle.requests[1].sampling.structured.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [b["properties"]["name"]["const"] for b in schema["items"]["anyOf"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
async def test_bad_tool_requests_are_400s(make_api, extra, param):
    _, handle, client = make_api(handle_kw={"max_model_len": 4096})
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and handle.requests == []


async def test_history_with_tool_calls_and_results(make_api):
    api, handle, client = make_api(handle_kw={"max_model_len": 4096})
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = await client.post("/v1/chat/completions", json={"messages": history, "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 200, r.text
    prompt = api._preparer.tokenizer.decode(handle.requests[0].prompt_token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    r = await client.post("/v1/chat/completions", json={"messages": MSGS + [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"]


# ---------------------------------------------------------------- formatting


async def _chunks(texts: list[str], finish: str = "stop"):
    for i, t in enumerate(texts):
        yield 0, GenerationChunk(request_id="r", text=t, token_ids=[1],
                                 finish_reason=finish if i == len(texts) - 1 else None)


def _usage():
    from router.protocol import UsageInfo
    return UsageInfo.of(1, 1, 0)


def _fmt(mode: ToolMode) -> ChatFormatter:
    return ChatFormatter("chatcmpl-x", "tiny", 1, logprobs=False, include_usage=False, tools=mode)


AUTO_OUT = ["I will check. ", "<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
            "\n</tool_call>", ""]


async def test_auto_tool_call_response_and_stream():
    mode = ToolMode("auto", "hermes", parallel=True)
    r = await _fmt(mode).aggregate(_chunks(AUTO_OUT), _usage)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "I will check."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    events = sse_events("".join([e async for e in _fmt(mode).stream(_chunks(AUTO_OUT), _usage)]))
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert "".join(d.get("content") or "" for d in deltas) == "I will check. "  # the marker never leaks
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # No call: plain content, also in the stream.
    plain = ["Paris is ", "sunny <", "3"]
    r = await _fmt(mode).aggregate(_chunks(plain), _usage)
    assert r.choices[0].message.content == "Paris is sunny <3" and r.choices[0].message.tool_calls is None
    events = sse_events("".join([e async for e in _fmt(mode).stream(_chunks(plain), _usage)]))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "Paris is sunny <3"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_named_call_streams_arguments():
    mode = ToolMode("named", "hermes", parallel=True, name="get_weather")
    out = ['{"city": ', '"Paris"', "}", ""]
    r = await _fmt(mode).aggregate(_chunks(out), _usage)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    events = sse_events("".join([e async for e in _fmt(mode).stream(_chunks(out), _usage)]))
    calls = [c for e in events[1:] for c in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert all(c.get("id") is None for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_required_calls_and_parallel_off():
    text = json.dumps([{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}])
    r = await _fmt(ToolMode("required", "hermes", parallel=True)).aggregate(_chunks([text]), _usage)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time", "get_weather"]
    r = await _fmt(ToolMode("required", "hermes", parallel=False)).aggregate(_chunks([text]), _usage)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
