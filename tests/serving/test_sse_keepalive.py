"""SSE keep-alives (router.sse_keepalive_s): a streaming request whose first token is slow starts its 200
response and sends `: keep-alive` comments until the token comes, so an idle proxy cannot cut it; fast
streams, errors before the response started and non-streaming requests behave as before."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest
import uvicorn

from tests.fixtures.asgi import asgi_stream
from tests.fixtures.fake_replicas import FORBIDDEN, FakeReplica, ReplicaDied, expected_text, metric_value, sse_events

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]
KEEPALIVE = ": keep-alive\n\n"


def split_keepalives(body: str) -> tuple[int, str]:
    """(number of leading keep-alive comments, the rest); comments anywhere else fail the test."""
    n = 0
    while body.startswith(KEEPALIVE):
        body = body[len(KEEPALIVE):]
        n += 1
    assert not any(line.startswith(":") for line in body.split("\n")), body
    return n, body


@contextlib.asynccontextmanager
async def served(app):
    """The app behind a real HTTP server on a loopback port (httpx's ASGI transport buffers whole bodies, so
    it cannot tell when the first byte left)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_slow_first_token_gets_keepalives_then_the_whole_stream(make_api, path):
    api, handle, client = make_api([FakeReplica("r0", first_delay_s=1.0)], sse_keepalive_s=0.2)
    assert (await client.get("/ready")).status_code == 200  # tokenizer loaded: the clock measures the request
    body = {"max_tokens": 4, "stream": True}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    async with served(api.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        t0 = time.monotonic()
        async with http.stream("POST", path, json=body) as r:
            first_byte_s = time.monotonic() - t0
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert "x-replica-id" not in r.headers  # started before any replica answered
            parts = [chunk async for chunk in r.aiter_text()]
    assert first_byte_s < 0.8, first_byte_s  # the response started before the first token (1 s)
    n, rest = split_keepalives("".join(parts))
    assert n >= 2
    events = sse_events(rest)
    assert all(e["id"] == events[0]["id"] for e in events)
    ids = handle.requests[0].prompt_token_ids
    if path == "/v1/completions":
        text = "".join(e["choices"][0]["text"] for e in events)
    else:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == expected_text(ids, 0, 4) and events[-1]["choices"][0]["finish_reason"] == "length"
    assert api.admission.queued == 0 and not api._active_ids


async def test_fast_first_token_and_early_errors_are_as_before(make_api):
    replicas = [FakeReplica("r0", first_delay_s=0.05), FakeReplica("dead", fail_on_call=True, error=ReplicaDied)]
    api, handle, client = make_api(replicas, max_attempts=1, sse_keepalive_s=0.5)
    stream = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    r = await client.post("/v1/completions", json=stream)
    assert r.status_code == 200 and r.headers["x-replica-id"] == "r0"
    assert split_keepalives(r.text)[0] == 0
    assert "".join(e["choices"][0]["text"] for e in sse_events(r.text)) == expected_text(PROMPT, 0, 3)
    # Failures before the first token, within sse_keepalive_s, keep their status code and JSON body.
    r = await client.post("/v1/completions", json=stream)  # round robin: the dead replica
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
    r = await client.post("/v1/completions", json={**stream, "prompt": [FORBIDDEN, 1, 2]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Non-streaming requests never get comments, however slow their first token.
    slow = FakeReplica("slow", first_delay_s=0.4)
    _, _, client = make_api([slow], sse_keepalive_s=0.1)
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-replica-id"] == "slow"
    assert r.json()["choices"][0]["text"] == expected_text(PROMPT, 0, 3)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_error_after_keepalives_ends_the_stream_with_the_error_event(make_api, path):
    dying = FakeReplica("a", first_delay_s=0.9, fail_on_call=True, error=ReplicaDied)
    api, handle, client = make_api([dying], max_attempts=1, sse_keepalive_s=0.2)
    await client.get("/ready")  # the tokenizer, while the replica still counts as alive
    body = {"max_tokens": 3, "stream": True}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = await client.post(path, json=body)
    assert r.status_code == 200 and "x-replica-id" not in r.headers
    n, rest = split_keepalives(r.text)
    assert n >= 2
    assert rest.endswith("data: [DONE]\n\n")
    events = rest.split("\n\n")[:-1]
    assert len(events) == 2, events  # nothing but the error event (no chat role opening) and [DONE]
    err = json.loads(events[0][len("data: "):])["error"]
    assert err["type"] == "service_unavailable_error" and err["code"] == "no_healthy_replica"
    assert api.admission.queued == 0 and not api._active_ids
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_requests_total{model="tiny",status="unavailable"}') == 1


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_client_disconnect_during_keepalives_cancels_replica_call(make_api, spec):
    queued = FakeReplica("queued", first_delay_s=5.0)
    api, handle, client = make_api([queued], sse_keepalive_s=0.05)
    await client.get("/ready")
    disconnect, seen = asyncio.Event(), []
    task = asyncio.create_task(asgi_stream(api.app, {"prompt": PROMPT, "max_tokens": 3, "stream": True},
                                            disconnect, seen, spec))
    for _ in range(200):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.01)
    assert [b.decode() for b in seen[:2]] == [KEEPALIVE] * 2  # waiting for its first token, connection kept busy
    assert queued.active == 1
    t0 = time.monotonic()
    disconnect.set()
    await asyncio.wait_for(task, 2)
    for _ in range(100):
        if queued.active == 0:
            break
        await asyncio.sleep(0.01)
    assert handle.cancelled == 1 and handle.streams[0].cancelled
    assert queued.active == 0  # the replica's generator was closed: its blocks would be freed
    assert time.monotonic() - t0 < 1.0  # long before the first token would have come
    assert api.admission.queued == 0 and not api._active_ids
    m = (await client.get("/metrics")).text
    assert metric_value(m, 'llmc_router_in_flight_requests{model="tiny"}') == 0
    assert metric_value(m, 'llmc_requests_total{model="tiny",status="cancelled"}') == 1
