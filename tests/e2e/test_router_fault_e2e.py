"""Fault injection under load on a real local Ray Serve cluster: 60 concurrent streaming requests over 3
tiny-model replicas, one replica actor killed (`ray.kill`) mid-stream. Every request must complete with
exactly max_tokens tokens (ignore_eos), no error reaches a client, and every greedy request streams the same
text as an undisturbed run (no token duplicated or lost across the failover)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from cluster.app import REPLICA_DEPLOYMENT
from tests.fixtures.configs import serve_config
from tests.fixtures.fake_replicas import metric_value
from tests.fixtures.wait import wait_until_async

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP = "fault-e2e"
N_REQUESTS = 60
MAX_TOKENS = 40
N_REPLICAS = 3


@pytest.fixture(scope="module")
def cluster(serve_app, tiny_model_dir):
    app = serve_app(serve_config(tiny_model_dir, {
        "engine.model_id": "tiny", "engine.num_kv_blocks": 512, "engine.max_model_len": 256,
        "replicas.num_replicas": N_REPLICAS, "router.max_attempts": 3}), name=APP)
    return app.base, app.handle


def _body(i: int) -> dict:
    greedy = i % 2 == 0
    return {"model": "tiny", "prompt": f"request {i}: the quick brown fox {i * 7} jumps", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True, "logprobs": 0, "stream_options": {"include_usage": True},
            "temperature": 0 if greedy else 0.8, "seed": None if greedy else i}


async def _stream(client: httpx.AsyncClient, i: int, progress: list[int]) -> dict:
    text, tokens, errors, finish, usage = [], [], [], None, None
    async with client.stream("POST", "/v1/completions", json=_body(i)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            elif event["choices"]:
                choice = event["choices"][0]
                text.append(choice["text"])
                tokens.extend(choice["logprobs"]["tokens"])
                finish = choice["finish_reason"] or finish
                progress[i] = len(tokens)
            else:
                usage = event["usage"]
    return {"text": "".join(text), "tokens": tokens, "errors": errors, "finish": finish, "usage": usage}


async def _run_all(base: str, during=None) -> list[dict]:
    progress = [0] * N_REQUESTS
    async with httpx.AsyncClient(base_url=base, timeout=120,
                                 limits=httpx.Limits(max_connections=N_REQUESTS + 4)) as client:
        tasks = [asyncio.create_task(_stream(client, i, progress)) for i in range(N_REQUESTS)]
        if during is not None:
            await during(progress)
        return await asyncio.gather(*tasks)


def _replica_actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{APP}#{REPLICA_DEPLOYMENT}#" in a["name"]]


def test_kill_replica_mid_stream_under_load(cluster):
    import ray

    base, handle = cluster
    t0 = time.monotonic()
    baseline = asyncio.run(_run_all(base))
    assert all(not r["errors"] and len(r["tokens"]) == MAX_TOKENS for r in baseline)

    # Slow every step by 50 ms (test-only hook), so that the streams are still running when the kill lands.
    names = _replica_actor_names()
    assert len(names) == N_REPLICAS
    slowed: set[str] = set()
    for _ in range(60):  # the handle picks replicas itself: call until each one has been reached
        slowed.add(handle._inject_fault.remote("slow").result())
        if len(slowed) == N_REPLICAS:
            break
    assert len(slowed) == N_REPLICAS
    killed = {}

    async def kill_mid_stream(progress: list[int]) -> None:
        # Half the streams are well under way.
        await wait_until_async(lambda: sum(1 for p in progress if p >= 3) >= N_REQUESTS // 2, 60, 0.02,
                               lambda: f"streams to start: {progress}")
        killed["progress"] = list(progress)
        victim = ray.get_actor(names[0], namespace="serve")
        ray.kill(victim, no_restart=True)

    faulted = asyncio.run(_run_all(base, kill_mid_stream))
    elapsed = time.monotonic() - t0

    assert max(killed["progress"]) < MAX_TOKENS, "the kill landed after the streams had finished"
    for i, (want, got) in enumerate(zip(baseline, faulted)):
        assert got["errors"] == [], (i, got["errors"])
        assert len(got["tokens"]) == MAX_TOKENS and got["usage"]["completion_tokens"] == MAX_TOKENS, i
        assert got["finish"] == "length", i
        if _body(i)["temperature"] == 0:
            assert got["text"] == want["text"] and got["tokens"] == want["tokens"], i
    metrics = httpx.get(base + "/metrics").text
    failovers = metric_value(metrics, 'llmc_failovers_total{model="tiny",outcome="resumed"}')
    assert metric_value(metrics, 'llmc_failovers_total{model="tiny",outcome="exhausted"}') == 0
    assert failovers >= 1, "no stream was resumed: the killed replica was serving nothing"
    print(f"\n{N_REQUESTS} streams x {MAX_TOKENS} tokens, one of {N_REPLICAS} replicas killed mid-stream: "
          f"{failovers:.0f} streams resumed elsewhere, 0 client errors; baseline + faulted run {elapsed:.1f}s")
