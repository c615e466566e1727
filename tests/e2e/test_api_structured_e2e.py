"""Issue 18 end to end on a local Ray Serve cluster (two tiny-model replicas) through the official `openai` client:
json_schema output validates at temperature 0.7 (streamed and not), tool calling (named, required, auto, a
tool-result round trip), unknown and unsupported fields, the cheap fields' effects and the extra endpoints."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.configs import serve_config
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.ray]

APP = "structured-e2e"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99},
                   "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
    "required": ["name", "age", "color", "ok", "tags"], "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def served(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 256, "engine.max_model_len": 1024,
        "replicas.num_replicas": 2, "router.max_attempts": 3}), name=APP)
    return app.base, app.handle


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_validates_at_temperature(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=FORMAT, temperature=0.7, n=8,
                                       max_tokens=200)
    assert len(r.choices) == 8
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    stream = client.chat.completions.create(model="tiny", messages=MSGS, response_format=FORMAT, temperature=0.7,
                                            n=4, max_tokens=200, stream=True, seed=5)
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert len(texts) == 4
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    obj = client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "json_object"},
                                         temperature=0.7, max_tokens=300, logit_bias={_token(client, "}"): 4})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def _token(client, text: str) -> str:
    ids = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"prompt": text,
                                                                                      "add_special_tokens": False})
    return str(ids.json()["tokens"][0])


def test_named_and_required_tool_choice(client):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], temperature=0.7, max_tokens=100,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                        WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], temperature=0.7,
                                            max_tokens=100, stream=True, tool_choice="required",
                                            # One call: with parallel calls allowed, a random model may keep
                                            # opening new ones until max_tokens ends the stream.
                                            parallel_tool_calls=False)
    args, names, finish = {}, {}, None
    for chunk in stream:
        c = chunk.choices[0]
        finish = c.finish_reason or finish
        for call in c.delta.tool_calls or []:
            names[call.index] = call.function.name or names.get(call.index)
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
    assert finish == "tool_calls" and names and set(names.values()) == {"get_weather"}
    for a in args.values():
        jsonschema.validate(json.loads(a), WEATHER["function"]["parameters"])


def test_tool_result_round_trip(client):
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=12)
    msg = r.choices[0].message
    assert msg.content and msg.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], temperature=0,
                                          max_tokens=12)
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls


def test_unknown_and_unsupported_fields_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate" and e.value.body["code"] == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", best_of=3)
    assert e.value.body["param"] == "best_of" and "not supported" in e.value.body["message"]


def test_cheap_fields_take_effect(client, served):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw)
    target = _token(client, " Paris")
    target_text = httpx.post(served[0] + "/detokenize", json={"tokens": [int(target)]}).json()["prompt"]
    biased = client.completions.create(logit_bias={target: 100}, **kw)
    assert biased.choices[0].text == target_text * 6 and target_text not in base.choices[0].text
    cut = client.completions.create(logit_bias={target: 100},
                                    **{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [int(target)]}})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == "" and cut.usage.completion_tokens == 1
    echo = client.completions.create(echo=True, **kw)
    assert echo.choices[0].text == "The quick brown fox" + base.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=MSGS, max_completion_tokens=3, temperature=0,
                                          user="alice", extra_body={"priority": -1, "ignore_eos": True})
    assert chat.usage.completion_tokens == 3
    events = [c for c in client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=5, temperature=0, stream=True, logprobs=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}) if c.choices and not c.choices[0].delta.role]
    sent = 0
    for c in events:  # each event: the usage so far (events may carry several tokens)
        sent += len(c.choices[0].logprobs.content)
        assert c.usage.completion_tokens == sent and c.usage.prompt_tokens > 0
    assert sent == 5
    # cache_salt: a tenant's prefix is cached for that tenant only.
    long = "Ray Serve routes requests to replicas; a paged KV cache stores keys and values in blocks. " * 3
    salted = dict(model="tiny", prompt=long, max_tokens=1, temperature=0)
    first = client.completions.create(extra_body={"cache_salt": "tenant-a"}, **salted)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Two replicas: the holder is found through the Redis index, which hears of new blocks a moment later;
    # until then a repeat may land on (and fill) the other replica.
    again = wait_until(lambda: client.completions.create(extra_body={"cache_salt": "tenant-a"}, **salted), 20, 0.3,
                       until=lambda r: r.usage.prompt_tokens_details.cached_tokens > 0, what="a tenant-a prefix hit")
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    other = client.completions.create(extra_body={"cache_salt": "tenant-b"}, **salted)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    base_url = served[0]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    ids = httpx.post(base_url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(base_url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    assert httpx.get(base_url + "/version").json()["version"]
