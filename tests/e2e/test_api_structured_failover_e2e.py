"""A constrained stream failed over mid-stream on a local Ray Serve cluster (two tiny-model replicas): the replica
actor serving it is killed after 6 tokens; the stream resumes on the other replica in the same grammar state, its
tokens equal an undisturbed seeded run's and its JSON validates."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import pytest

from cluster.app import REPLICA_DEPLOYMENT
from tests.fixtures.configs import serve_config
from tests.fixtures.fake_replicas import metric_value

pytestmark = [pytest.mark.ray]

APP = "structured-failover-e2e"
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def served(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 256, "engine.max_model_len": 1024,
        "replicas.num_replicas": 2, "router.max_attempts": 3,
        "router.sse_keepalive_s": 120}), name=APP)  # streams name their replica (x-replica-id) on a slow box
    return app.base, app.handle


def _replica_actor(replica_id: str):
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and f"{APP}#{REPLICA_DEPLOYMENT}#" in a["name"] and a["name"].endswith(replica_id):
            return ray.get_actor(a["name"], namespace="serve")
    raise AssertionError(f"no actor for replica {replica_id}")


async def _stream(base: str, body: dict, kill_after: int | None = None) -> tuple[str, list[str], list]:
    text, tokens, errors = [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            replica = r.headers.get("x-replica-id")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                for ch in event["choices"]:
                    text.append(ch["delta"].get("content") or "")
                    tokens += [t["token"] for t in (ch.get("logprobs") or {}).get("content") or []]
                if kill_after is not None and len(tokens) == kill_after:
                    import ray
                    assert replica, "the stream's replica is unknown"
                    ray.kill(_replica_actor(replica), no_restart=True)
    return "".join(text), tokens, errors


# Long enough (about 200 tokens) that a kill after the 6th token lands mid-stream even at full speed.
LIST_SCHEMA = {"type": "array", "minItems": 16, "maxItems": 16, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "ok"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}}


@pytest.mark.slow
def test_constrained_stream_fails_over_mid_stream(served):
    base, handle = served
    fmt = {"type": "json_schema", "json_schema": {"name": "items", "schema": LIST_SCHEMA}}
    body = {"model": "tiny", "messages": MSGS, "response_format": fmt, "temperature": 0.7, "seed": 21,
            "max_tokens": 600, "stream": True, "logprobs": True}
    want_text, want_tokens, errors = asyncio.run(_stream(base, body))
    assert not errors and len(want_tokens) > 60
    jsonschema.validate(json.loads(want_text), LIST_SCHEMA)
    for _ in range(8):  # best effort: slower steps make the kill land earlier still
        handle._inject_fault.remote("slow").result()
    t0 = time.monotonic()
    text, tokens, errors = asyncio.run(_stream(base, body, kill_after=6))
    assert errors == [], errors
    assert tokens == want_tokens and text == want_text  # one unbroken stream: same seed, same tokens
    jsonschema.validate(json.loads(text), LIST_SCHEMA)
    metrics = httpx.get(base + "/metrics").text
    assert metric_value(metrics, 'llmc_failovers_total{model="tiny",outcome="resumed"}') >= 1
    print(f"\nconstrained stream failed over after 6 of {len(tokens)} tokens in {time.monotonic() - t0:.1f}s")
