"""Property-based fuzzing of the served OpenAPI schema (schemathesis) against the ASGI app with a fake
replica handle: whatever the generated request (schema-valid or not), the API never answers 5xx or a bare
422, and every response carries x-request-id. Bounded: a fixed number of derandomized examples."""
from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.fixtures.fake_replicas import FakeReplica


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz_no_server_errors(make_api, mode):
    api, handle, _ = make_api([FakeReplica("r0")], handle_kw={"max_model_len": 48})  # short outputs: fast
    asyncio.run(api.preparer())  # load the tokenizer up front: the transport's per-request timeout is 10 s
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    seen: dict[int, int] = {}

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code != 422, response.text[:200]
        assert response.headers.get("x-request-id")

    run()
    assert sum(seen.values()) >= 30 and max(seen) < 500, seen
    if mode == GenerationMode.POSITIVE:
        assert seen.get(200, 0) > 0 and handle.requests  # valid requests did reach the fake replica
