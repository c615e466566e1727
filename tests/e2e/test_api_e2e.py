"""The API end to end on a real local Ray Serve cluster with the tiny model, through the official `openai`
client: completions, chat, streaming, n > 1, logprobs, stop, usage, errors; and a client disconnect
mid-stream freeing the replica's KV blocks."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.fixtures.configs import serve_config
from tests.fixtures.fake_replicas import metric_value
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.ray]

APP = "api-e2e"
KEY = "sk-e2e-test"


@pytest.fixture(scope="module")
def served(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 24, "engine.max_model_len": 512,
        "replicas.num_replicas": 1, "router.api_keys": f"[{KEY}]"}), name=APP)
    return app.base, app.handle


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completions_and_usage(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="Ray Serve routes requests", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_chat_stream(client):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_n_and_seeded_sampling(client):
    kw = dict(model="tiny", prompt="0 1 2 3", max_tokens=6, n=3, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert client.completions.create(**kw).choices[1].text == r.choices[1].text  # seeded: reproducible
    chunks = list(client.completions.create(stream=True, **kw))
    by_index = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert by_index == {c.index: c.text for c in r.choices}


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) >= 1 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_stop_strings(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop and stop in full
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_errors_through_the_client(client, served):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"
    # Within the context (512) but beyond this replica's KV pool (24 blocks x 16): the engine's EngineError
    # crosses Ray as a 400, and is not retried.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=450)
    assert "KV blocks" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-a-model", prompt="x")
    bad = openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(served[0] + "/metrics")
    assert r.status_code == 200 and "llmc_time_to_first_token_seconds_bucket" in r.text
    assert metric_value(r.text, 'llmc_requests_total{model="tiny",status="bad_request"}') >= 2
    assert "llmc_request_retries_total{" not in r.text  # the engine's 400 was not retried


def test_disconnect_mid_stream_frees_blocks(served):
    base, replica = served
    # Each engine step 50 ms slower (test-only hook), so the 300-token stream is still running when we leave.
    # Last test of the module: nothing after it needs the replica fast.
    replica._inject_fault.remote("slow").result()
    before = replica.stats.remote().result()
    assert before.kv_blocks_free == before.kv_blocks_total
    body = {"model": "tiny", "prompt": "The quick brown fox " * 4, "max_tokens": 300, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 3:
                break
        during = replica.stats.remote().result()
        assert during.num_running == 1 and during.kv_blocks_free < during.kv_blocks_total
    s = wait_until(lambda: replica.stats.remote().result(), 10, 0.05, check=False,
                   until=lambda s: s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total)
    assert s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0, s
    # The request was aborted, not run to its end: far fewer than 300 decode steps happened.
    assert s.steps - during.steps < 200
