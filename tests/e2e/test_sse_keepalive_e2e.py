"""SSE keep-alives end to end on a real local Ray Serve cluster: one tiny-model replica with one sequence slot
and slow steps, so a second stream waits in the replica's queue. Its comments must cross Serve's proxy as they
are sent (not held until the first token), the official client must read the stream that follows them, and a
client leaving during them must take the queued request out of the replica (its KV blocks free)."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.fixtures.configs import serve_config
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.ray]

APP = "keepalive-e2e"
KEEPALIVE_S = 0.3


@pytest.fixture(scope="module")
def served(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 64, "engine.max_model_len": 512,
        "engine.max_num_seqs": 1, "replicas.num_replicas": 1, "router.sse_keepalive_s": KEEPALIVE_S}), name=APP)
    app.handle._inject_fault.remote("slow").result()  # every engine step 50 ms longer
    return app.base, app.handle


def _occupy(http: httpx.Client, base: str, max_tokens: int):
    """A stream holding the replica's only slot; returns (context, its line iterator) once its first event
    came. Keep both: dropping the iterator closes the connection (and so cancels the request)."""
    body = {"model": "tiny", "prompt": "The quick brown fox " * 4, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    ctx = http.stream("POST", base + "/v1/completions", json=body)
    r = ctx.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    next(line for line in lines if line.startswith("data: "))  # it may have had keep-alives itself
    return ctx, lines


def _wait_stats(replica, ok) -> dict:
    """The replica's stats once ok(stats), or the last ones after 15 s (the caller asserts on them)."""
    return wait_until(lambda: replica.stats.remote().result().model_dump(), 15, 0.05, until=ok, check=False)


def test_queued_stream_gets_keepalives_through_serve_then_its_tokens(served):
    base, replica = served
    with httpx.Client(timeout=60) as http:
        ctx, _held = _occupy(http, base, max_tokens=60)  # ~3 s of slow steps
        try:
            body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "ignore_eos": True, "stream": True}
            t0 = time.monotonic()
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                head_s = time.monotonic() - t0
                lines, first_line_s = [], None
                for line in r.iter_lines():
                    first_line_s = first_line_s or time.monotonic() - t0
                    lines.append(line)
        finally:
            ctx.__exit__(None, None, None)
    assert r.status_code == 200 and "x-replica-id" not in r.headers, (r.status_code, r.headers, head_s, lines)
    assert first_line_s < 1.5, first_line_s  # the comment came through the proxy, not with the first token
    comments = [x for x in lines if x.startswith(":")]
    data = [x for x in lines if x.startswith("data: ")]
    assert len(comments) >= 2 and lines.index(comments[-1]) < lines.index(data[0])
    assert data[-1] == "data: [DONE]"
    events = [json.loads(x[len("data: "):]) for x in data[:-1]]
    assert events and events[-1]["choices"][0]["finish_reason"] == "length"
    # The official client reads a stream that starts with comments as any other.
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    with httpx.Client(timeout=60) as http:
        ctx, _held = _occupy(http, base, max_tokens=40)
        try:
            chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=4,
                                                    stream=True, extra_body={"ignore_eos": True}))
        finally:
            ctx.__exit__(None, None, None)
    assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_client_leaving_during_keepalives_frees_the_queued_request(served):
    base, replica = served
    idle = _wait_stats(replica, lambda s: s["num_running"] == 0 and s["num_waiting"] == 0)
    assert idle["kv_blocks_free"] == idle["kv_blocks_total"], idle
    with httpx.Client(timeout=60) as http:
        ctx, _held = _occupy(http, base, max_tokens=300)  # ~15 s: the second stream stays queued
        try:
            body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "stream": True}
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                seen = []
                for line in r.iter_lines():
                    seen.append(line)
                    if sum(x.startswith(":") for x in seen) >= 2:
                        break
                assert not any(x.startswith("data: ") for x in seen)
                assert replica.stats.remote().result().num_waiting == 1
            # Gone: the queued request leaves the replica while the first still runs.
            s = _wait_stats(replica, lambda s: s["num_waiting"] == 0)
            assert s["num_waiting"] == 0 and s["num_running"] == 1, s
        finally:
            ctx.__exit__(None, None, None)
    s = _wait_stats(replica, lambda s: s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"])
    assert s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"], s
