"""A constrained stream failed over mid-stream, through the real router (ResumableGeneration, formatter) and two
real engines behind a fake replica handle (no Ray): the replica serving the stream dies after a few chunks, the
stream resumes on the other engine with the tokens delivered so far, and the client sees one stream whose tokens
equal an undisturbed run's (seeded sampling at temperature 0.7) and whose JSON validates against the schema."""
from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from replicas.engine.async_engine import AsyncLLMEngine
from replicas.engine.config import EngineConfig
from tests.fixtures.fake_replicas import ReplicaDied, sse_events

SCHEMA = {"type": "array", "minItems": 8, "maxItems": 8, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "ok"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}}


@dataclasses.dataclass
class EngineReplica:
    """A FakeReplicas entry backed by a real engine; dies (for good) after `die_after_chunks` chunks."""
    name: str
    engine: AsyncLLMEngine
    die_after_chunks: int | None = None
    alive: bool = True
    requests: list = dataclasses.field(default_factory=list)

    async def generate(self, req):
        self.requests.append(req)
        if not self.alive:
            raise ReplicaDied("replica died")
        stream = self.engine.generate(req)
        try:
            sent = 0
            async for chunk in stream:
                if self.die_after_chunks is not None and sent >= self.die_after_chunks:
                    self.alive = False
                    raise ReplicaDied("replica died")
                sent += 1
                yield chunk
        finally:
            await stream.aclose()


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    made = [AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", num_kv_blocks=256, block_size=4,
                                        warmup=False)) for _ in range(2)]
    yield made
    for e in made:
        e.shutdown()


async def _stream(make_api, tiny_model_dir, replicas) -> tuple[str, list[str], list]:
    _, handle, client = make_api(replicas, handle_kw={"max_model_len": 1024, "block_size": 4}, max_attempts=3)
    handle.model_dir = tiny_model_dir  # the router tokenizes with the engines' tokenizer
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "List items as JSON."}], "max_tokens": 400, "stream": True,
        "temperature": 0.7, "seed": 13, "logprobs": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    errors = [e for e in events if "error" in e]
    text = "".join(c["delta"].get("content") or "" for e in events if "choices" in e for c in e["choices"])
    tokens = [t["token"] for e in events if "choices" in e for c in e["choices"]
              for t in (c.get("logprobs") or {}).get("content") or []]
    return text, tokens, errors


async def test_constrained_stream_fails_over_with_exact_tokens(make_api, tiny_model_dir, engines):
    want_text, want_tokens, errors = await _stream(make_api, tiny_model_dir, [EngineReplica("solo", engines[0])])
    assert not errors
    jsonschema.validate(json.loads(want_text), SCHEMA)
    dying, spare = EngineReplica("a", engines[0], die_after_chunks=3), EngineReplica("b", engines[1])
    text, tokens, errors = await _stream(make_api, tiny_model_dir, [dying, spare])
    assert errors == [] and not dying.alive
    resumed = spare.requests[-1]
    assert resumed.resume_token_ids and 0 < len(resumed.resume_token_ids[0]) < len(want_tokens)  # mid-stream
    assert resumed.sampling.structured is not None
    assert tokens == want_tokens and text == want_text
    jsonschema.validate(json.loads(text), SCHEMA)
