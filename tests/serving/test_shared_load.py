"""SharedLoad: one load for all callers that no caller's cancellation can poison, and the ingress's
tokenizer load under Serve's child-request cancellation."""
from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from router.shared_load import LoadCancelled, SharedLoad
from tests.fixtures.fake_replicas import FakeReplica


def _counting_load(delay_s: float = 0.0, fail_first: int = 0):
    calls = []

    async def load(*args):
        calls.append(args)
        await asyncio.sleep(delay_s)
        if len(calls) <= fail_first:
            raise RuntimeError("not yet")
        return f"value-{len(calls)}"
    return load, calls


async def test_a_caller_giving_up_leaves_the_load_running():
    load, calls = _counting_load(delay_s=0.2)
    shared = SharedLoad(load, "x")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(shared.get(), 0.05)
    assert await shared.get() == "value-1"
    assert await shared.get() == "value-1"
    assert len(calls) == 1


async def test_a_cancelled_load_is_retried_by_the_next_caller():
    load, calls = _counting_load(delay_s=0.2)
    shared = SharedLoad(load, "x")
    waiter = asyncio.ensure_future(shared.get())
    await asyncio.sleep(0.05)
    shared._task.cancel()  # e.g. Serve cancelling what it took for a child of a cancelled request
    with pytest.raises(LoadCancelled):  # the waiter was not cancelled itself: a clean, retryable error
        await waiter
    assert await shared.get() == "value-2"
    assert len(calls) == 2


async def test_a_failed_load_is_retried_and_args_reach_the_new_load():
    load, calls = _counting_load(fail_first=1)
    shared = SharedLoad(load, "x")
    with pytest.raises(RuntimeError):
        await shared.get("hint-1")
    assert await shared.get("hint-2") == "value-2"
    assert calls == [("hint-1",), ("hint-2",)]


async def test_background_load_retries_until_it_succeeds():
    load, calls = _counting_load(fail_first=2)
    shared = SharedLoad(load, "x")
    task = shared.start_in_background(retry_s=0.01)
    await asyncio.wait_for(task, 5)
    assert shared.value == "value-3"


async def test_the_load_runs_outside_the_callers_serve_request_context():
    from ray.serve import context as serve_context

    seen = []

    async def load():
        seen.append(serve_context._get_serve_request_context())
        return 1

    serve_context._serve_request_context.set(serve_context._RequestContext(
        _internal_request_id="probe-1", cancel_on_parent_request_cancel=True))
    assert await SharedLoad(load, "x").get() == 1
    assert seen[0]._internal_request_id == "" and not seen[0].cancel_on_parent_request_cancel


async def test_an_impatient_probe_before_any_replica_cannot_break_the_endpoint(make_api):
    """What a Kubernetes readiness probe did: /v1/models before the replica is up, with a short client
    timeout. Serve then cancels every handle call made under that request (its children); the model_info
    call of the shared tokenizer load must not be one of them."""
    from ray.serve import context as serve_context

    _, handle, client = make_api([FakeReplica("r0")], handle_kw={"info_delay_s": 0.5})
    children: dict[str, list] = defaultdict(list)
    real = handle.model_info.remote

    def remote():  # as Serve's ReplicaResult: a call made under a request is tracked as its child
        fut = asyncio.ensure_future(real())
        ctx = serve_context._get_serve_request_context()
        if ctx.cancel_on_parent_request_cancel:
            children[ctx._internal_request_id].append(fut)
        return fut
    handle.model_info.remote = remote

    async def probe():
        serve_context._serve_request_context.set(serve_context._RequestContext(
            _internal_request_id="probe-1", cancel_on_parent_request_cancel=True))
        return await client.get("/v1/models")

    task = asyncio.ensure_future(probe())
    await asyncio.sleep(0.1)
    task.cancel()  # the client gave up: Serve cancels the request and all its children
    for child in children.pop("probe-1", []):
        child.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):
        r = await client.get("/v1/models")
        assert r.status_code == 200, r.text
        assert (await client.get("/ready")).status_code == 200
