"""Every error class of the API: exact status, OpenAI error shape and type; no bare 422; x-request-id on errors."""
from __future__ import annotations

import asyncio
import logging

import pytest

from tests.fixtures.fake_replicas import FakeReplica, ReplicaDied, metric_value

PROMPT = [5, 6, 7, 8]


def assert_error(r, status: int, etype: str, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == etype, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    assert r.headers.get("x-request-id")
    return body["error"]


@pytest.mark.parametrize("payload,param", [
    ({"prompt": PROMPT, "temperature": 5}, "temperature"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt": PROMPT, "logprobs": 99}, "logprobs"),
    ({"prompt": PROMPT, "stop": ["x"] * 17}, "stop"),
    ({"max_tokens": 3}, "prompt"),  # missing prompt
    ({"prompt": PROMPT, "top_p": "high"}, "top_p"),
])
async def test_invalid_params_are_400_not_422(make_api, payload, param):
    _, _, client = make_api()
    r = await client.post("/v1/completions", json=payload)
    err = assert_error(r, 400, "invalid_request_error", code="invalid_value")
    assert err["param"].split(".")[0] == param


async def test_malformed_bodies_are_400(make_api):
    _, _, client = make_api()
    for content in (b"{not json", b"[]", b"", b'"str"'):
        r = await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_request_error")
    r = await client.post("/v1/chat/completions", json={"messages": []})
    assert_error(r, 400, "invalid_request_error", param="messages")
    r = await client.post("/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})
    assert_error(r, 400, "invalid_request_error")
    r = await client.post("/v1/completions", json={"prompt": []})
    assert_error(r, 400, "invalid_request_error", param="prompt")
    r = await client.post("/v1/completions", json={"prompt": [1, 10**9]})  # token id outside the vocabulary
    assert_error(r, 400, "invalid_request_error", param="prompt")


async def test_context_overflow_is_400(make_api):
    _, handle, client = make_api()  # fake max_model_len = 128
    r = await client.post("/v1/completions", json={"prompt": [3] * 100, "max_tokens": 29})
    assert_error(r, 400, "invalid_request_error", code="context_length_exceeded", param="max_tokens")
    r = await client.post("/v1/completions", json={"prompt": [3] * 128})
    assert_error(r, 400, "invalid_request_error", code="context_length_exceeded")
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello " * 200}]})
    assert_error(r, 400, "invalid_request_error", code="context_length_exceeded")
    assert handle.requests == []  # rejected before any replica saw them
    r = await client.post("/v1/completions", json={"prompt": [3] * 100, "max_tokens": 28})
    assert r.status_code == 200


async def test_auth_closed_and_open_endpoints(make_api):
    _, _, client = make_api(api_keys=["sk-one", "sk-two"])
    body = {"prompt": PROMPT, "max_tokens": 2}
    assert_error(await client.post("/v1/completions", json=body), 401, "authentication_error", code="missing_api_key")
    r = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"})
    assert_error(r, 401, "authentication_error", code="invalid_api_key")
    r = await client.post("/v1/completions", json=body, headers={"Authorization": "Basic sk-one"})
    assert_error(r, 401, "authentication_error")
    assert_error(await client.get("/v1/models"), 401, "authentication_error")
    for key in ("sk-one", "sk-two"):
        r = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status_code == 200, path


async def test_auth_keys_from_env(make_api, monkeypatch):
    monkeypatch.setenv("LLM_CLUSTER_API_KEYS", "sk-env, sk-env2")
    from cluster.config import ClusterConfig
    from router.auth import ApiKeys

    keys = ApiKeys.from_config(ClusterConfig().router)
    assert len(keys) == 2 and not keys.open
    keys.check("Bearer sk-env2")


async def test_open_endpoint_warns_and_never_logs_keys(make_api, caplog):
    caplog.set_level(logging.INFO, logger="llm_cluster")
    _, _, client = make_api()
    assert any(r.levelno == logging.WARNING and "OPEN" in r.getMessage() for r in caplog.records)
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200
    caplog.clear()
    _, _, client = make_api(api_keys=["sk-secret-123"])
    await client.post("/v1/completions", json={"prompt": "a secret prompt", "max_tokens": 2},
                      headers={"Authorization": "Bearer sk-secret-123"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "sk-secret-123" not in text and "a secret prompt" not in text
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


async def test_unknown_model_and_path_are_404(make_api):
    _, _, client = make_api()
    r = await client.post("/v1/completions", json={"model": "gpt-17", "prompt": PROMPT})
    assert_error(r, 404, "not_found_error", code="model_not_found", param="model")
    r = await client.post("/v1/chat/completions",
                          json={"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 404, "not_found_error", code="model_not_found")
    assert_error(await client.get("/v1/nothing"), 404, "not_found_error")
    assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT})).status_code == 200


async def test_body_over_limit_is_413(make_api):
    _, handle, client = make_api(max_body_bytes=2048)
    big = {"prompt": "x" * 4000}
    assert_error(await client.post("/v1/completions", json=big), 413, "invalid_request_error", code="request_too_large")

    async def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield b" " * 1000

    r = await client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, "invalid_request_error", code="request_too_large")
    assert handle.requests == []


async def test_admission_429_with_retry_after(make_api):
    slow = FakeReplica("slow", delay_s=0.3)
    _, handle, client = make_api([slow], max_queued_requests=1)
    first = asyncio.create_task(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}))
    for _ in range(200):
        if slow.active:
            break
        await asyncio.sleep(0.005)
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert_error(r, 429, "rate_limit_error", code="too_many_requests")
    assert int(r.headers["retry-after"]) >= 1
    assert (await first).status_code == 200
    # After the first token the slot is free again.
    assert (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, 'llmc_requests_total{model="tiny",status="overloaded"}') == 1
    assert metric_value(metrics, 'llmc_requests_total{model="tiny",status="ok"}') == 2


async def test_no_healthy_replica_is_503(make_api):
    dead = [FakeReplica("a", fail_on_call=True, error=ReplicaDied),
            FakeReplica("b", fail_on_call=True, error=ReplicaDied)]
    _, handle, client = make_api(dead, max_attempts=3)
    # Tokenizer/model info are loaded while a replica still lives.
    assert (await client.get("/ready")).status_code == 200
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert_error(r, 503, "service_unavailable_error", code="no_healthy_replica")
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert_error(r, 503, "service_unavailable_error")
    assert_error(await client.get("/ready"), 503, "service_unavailable_error")


async def test_tokenizer_load_survives_impatient_probes(make_api, monkeypatch):
    """A /ready probe that gives up does not cancel the shared tokenizer load: the next caller
    finds it running (or done) instead of starting over, so it is built exactly once."""
    import asyncio
    import time

    import router.api

    built = []
    real = router.api.PromptPreparer

    def slow_preparer(info):
        time.sleep(0.4)  # a large tokenizer on a busy machine
        built.append(info)
        return real(info)

    monkeypatch.setattr(router.api, "PromptPreparer", slow_preparer)
    _, handle, client = make_api()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.get("/ready"), 0.15)
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert (await client.get("/ready")).status_code == 200
    assert len(built) == 1


async def test_first_request_waits_for_a_cold_start(make_api):
    _, handle, client = make_api(handle_kw={"info_delay_s": 1.0})  # no replica answers for 1 s
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text


async def test_not_ready_without_replicas(make_api):
    _, _, client = make_api(handle_kw={"info_error": True})
    assert (await client.get("/health")).status_code == 200
    assert_error(await client.get("/ready"), 503, "service_unavailable_error", code="no_healthy_replica")
    r = await client.post("/v1/completions", json={"prompt": PROMPT})
    assert_error(r, 503, "service_unavailable_error")


async def test_engine_error_is_400_and_not_retried(make_api):
    _, handle, client = make_api([FakeReplica("a"), FakeReplica("b")])
    r = await client.post("/v1/completions", json={"prompt": [99, 1, 2]})
    err = assert_error(r, 400, "invalid_request_error")
    assert "forbidden token 99" in err["message"]
    assert len(handle.requests) == 1


async def test_request_id_echoed_on_errors_and_success(make_api):
    _, handle, client = make_api(api_keys=["k"])
    r = await client.post("/v1/completions", json={"prompt": PROMPT}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "abc-123"
    auth = {"Authorization": "Bearer k"}
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                          headers={"x-request-id": "req-42", **auth})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert handle.requests[-1].request_id == "req-42"
    assert r.json()["id"] == "cmpl-req-42"
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=auth)
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and handle.requests[-1].request_id == generated
    # Unsafe ids are replaced, not echoed.
    r = await client.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


async def test_unexpected_error_is_500_in_the_same_shape(make_api):
    api, handle, client = make_api()

    async def broken_info():
        return {"model_id": "tiny"}  # a replica answering garbage: a bug, not the client's fault

    handle.model_info.remote = broken_info
    r = await client.post("/v1/completions", json={"prompt": PROMPT}, headers={"x-request-id": "boom"})
    assert_error(r, 500, "internal_error", code="internal_error")
    assert r.headers["x-request-id"] == "boom"


async def test_method_not_allowed_in_the_same_shape(make_api):
    _, _, client = make_api()
    assert_error(await client.get("/v1/completions"), 405, "invalid_request_error", code="method_not_allowed")


async def test_large_prompt_is_tokenized_off_the_event_loop(make_api, monkeypatch):
    import threading

    api, handle, client = make_api(handle_kw={"max_model_len": 100_000})
    await client.get("/ready")
    threads = []
    encode = api._preparer.encode
    monkeypatch.setattr(api._preparer, "encode", lambda t: threads.append(threading.current_thread()) or encode(t))
    await client.post("/v1/completions", json={"prompt": "fox " * 20_000, "max_tokens": 1})
    await client.post("/v1/completions", json={"prompt": "fox", "max_tokens": 1})
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()
