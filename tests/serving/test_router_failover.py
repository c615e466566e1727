"""Retries before the first token, mid-stream failover with exact token continuity, bounded attempts, the
error event, aborts, and client-disconnect cancellation, on fake replicas (no Ray)."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.fixtures.asgi import asgi_stream
from tests.fixtures.fake_replicas import FakeReplica, ReplicaDied, expected_text, metric_value, sse_events, token_at

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


async def test_retry_before_first_token(make_api):
    a, b = FakeReplica("a", fail_on_call=True), FakeReplica("b")  # a raises Ray's ActorDiedError
    _, handle, client = make_api([a, b])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6},
                          headers={"x-request-id": "rq"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected_text(PROMPT, 0, 6)
    assert [q.request_id for q in a.requests] == ["rq"] and [q.request_id for q in b.requests] == ["rq-2"]
    assert b.requests[0].resume_token_ids is None  # nothing was delivered yet
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_request_retries_total{model="tiny",reason="replica_died"}') == 1
    assert "llmc_failovers_total{" not in m


@pytest.mark.parametrize("stream", [True, False])
async def test_mid_stream_failover_continues_exactly(make_api, stream):
    a, b = FakeReplica("a", die_after_chunks=3), FakeReplica("b")
    _, handle, client = make_api([a, b])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "stream": stream,
                                                    "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    if stream:
        events = sse_events(r.text)
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        assert sum(1 for e in events if e["choices"]) == 8  # one event per token: nothing repeated or lost
        usage = events[-1]["usage"]
    else:
        text = r.json()["choices"][0]["text"]
        usage = r.json()["usage"]
    assert text == expected_text(PROMPT, 0, 8)
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] == 9
    # The second replica was asked to continue after exactly the 3 delivered tokens (the fake asserts them).
    assert b.requests[0].resume_token_ids == [[token_at(PROMPT, 0, j) for j in range(3)]]
    assert b.requests[0].prompt_token_ids == PROMPT
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_failovers_total{model="tiny",outcome="resumed"}') == 1
    assert "llmc_request_retries_total{" not in m


async def test_mid_stream_failover_n2_with_seed(make_api):
    a, b = FakeReplica("a", die_after_chunks=5, error=ReplicaDied), FakeReplica("b")
    _, _, client = make_api([a, b])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "n": 2, "seed": 3,
                                                    "stream": True})
    events = sse_events(r.text)
    for i in (0, 1):
        got = "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
        assert got == expected_text(PROMPT, i, 4, seed=3)
    resume = b.requests[0].resume_token_ids
    assert [len(x) for x in resume] == [3, 2]  # chunks went 0,1,0,1,0 before the death


async def test_failover_after_one_choice_finished(make_api):
    # n=2, choice 0 gets 2 tokens then finishes at max_tokens=2 ... the fake interleaves, so with
    # die_after_chunks=3 choice 0 has delivered [t0, t1] (finished) and choice 1 [t0].
    a, b = FakeReplica("a", die_after_chunks=3), FakeReplica("b")
    _, _, client = make_api([a, b])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 2, "seed": 1})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [expected_text(PROMPT, i, 2, seed=1) for i in (0, 1)]
    assert r.json()["usage"]["completion_tokens"] == 4
    # The finished choice is resumed one token short (the engine refuses a full one); its output is dropped.
    assert [len(x) for x in b.requests[0].resume_token_ids] == [1, 1]


async def test_two_failures_then_success_and_suffixed_ids(make_api):
    # Round robin: a dies, then c (next in turn), then b finishes.
    reps = [FakeReplica("a", die_after_chunks=2), FakeReplica("b"), FakeReplica("c", die_after_chunks=2)]
    _, handle, client = make_api(reps, max_attempts=3)
    r = await client.post("/v1/chat/completions", headers={"x-request-id": "xx"},
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stream": True})
    events = sse_events(r.text)
    ids = handle.requests[0].prompt_token_ids
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == expected_text(ids, 0, 7)
    assert [q.request_id for q in handle.requests] == ["xx", "xx-2", "xx-3"]
    assert [len(q.resume_token_ids[0]) if q.resume_token_ids else 0 for q in handle.requests] == [0, 2, 4]


async def test_attempts_exhausted_mid_stream_ends_with_error_event(make_api):
    reps = [FakeReplica("a", die_after_chunks=2), FakeReplica("b"), FakeReplica("c", die_after_chunks=1)]
    _, handle, client = make_api(reps, max_attempts=2)  # a, then c: b is never asked
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "stream": True})
    assert r.status_code == 200  # the stream had started
    parts = r.text.split("\n\n")
    assert parts[-2] == "data: [DONE]"
    err = json.loads(parts[-3][6:])
    assert err["error"]["type"] == "service_unavailable_error" and err["error"]["code"] == "no_healthy_replica"
    text = "".join(json.loads(p[6:])["choices"][0]["text"] for p in parts[:-3])
    assert text == expected_text(PROMPT, 0, 3)  # what was delivered is a clean prefix
    assert len(handle.requests) == 2 and reps[1].requests == []  # bounded by max_attempts
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_failovers_total{model="tiny",outcome="resumed"}') == 1
    assert metric_value(m, 'llmc_failovers_total{model="tiny",outcome="exhausted"}') == 1
    assert metric_value(m, 'llmc_requests_total{model="tiny",status="unavailable"}') == 1


async def test_attempts_exhausted_non_stream_is_503(make_api):
    reps = [FakeReplica("a", die_after_chunks=2), FakeReplica("b", die_after_chunks=1)]
    _, handle, client = make_api(reps, max_attempts=2)
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"


async def test_abort_from_replica_resumes_elsewhere(make_api):
    a, b = FakeReplica("a", abort_after_chunks=2), FakeReplica("b")
    _, _, client = make_api([a, b])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    assert r.json()["choices"][0] == {"index": 0, "text": expected_text(PROMPT, 0, 5), "logprobs": None,
                                      "finish_reason": "length"}
    assert len(b.requests[0].resume_token_ids[0]) == 2


async def test_replica_dying_after_last_token_is_not_an_error(make_api):
    a, b = FakeReplica("a", die_after_chunks=4), FakeReplica("b")
    _, _, client = make_api([a, b])
    # n=1, 4 tokens: the fake dies on its 5th chunk attempt, which never comes; with 2 choices x 2 tokens the
    # last chunk is the 4th: the request completes on replica a alone.
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 2})
    assert r.status_code == 200 and b.requests == []


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_client_disconnect_cancels_replica_call(make_api, spec):
    slow = FakeReplica("slow", delay_s=0.02)
    api, handle, client = make_api([slow], handle_kw={"max_model_len": 4096})
    await client.get("/ready")  # load the tokenizer first
    disconnect, seen = asyncio.Event(), []
    task = asyncio.create_task(asgi_stream(api.app, {"prompt": PROMPT, "max_tokens": 500, "stream": True},
                                            disconnect, seen, spec))
    for _ in range(300):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.01)
    assert slow.active == 1
    disconnect.set()
    await asyncio.wait_for(task, 5)
    for _ in range(100):
        if slow.active == 0:
            break
        await asyncio.sleep(0.01)
    assert handle.cancelled == 1 and handle.streams[0].cancelled
    assert slow.active == 0  # the replica's generator was closed: its blocks would be freed
    assert len(seen) < 100
    assert api.admission.queued == 0 and not api._active_ids
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_router_in_flight_requests{model="tiny"}') == 0
    assert metric_value(m, 'llmc_requests_total{model="tiny",status="cancelled"}') == 1
