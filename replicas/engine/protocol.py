"""The engine's typed records: what a generation request carries, what streams back, and the engine's stats. The
router and the replica speak them too (a request crosses from ingress to replica unchanged).

Plain pydantic models so they cross Ray process boundaries unchanged.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "abort"]


class StructuredOutput(BaseModel):
    """A grammar the output must follow, enforced by constrained decoding (replicas.engine.grammar):
    any JSON object, or JSON valid against `json_schema` (a JSON Schema as JSON text)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_object", "json_schema"]
    json_schema: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "StructuredOutput":
        if (self.kind == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required for kind json_schema, and only for it")
        return self


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=16)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 -> greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0 -> off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI)
    structured: StructuredOutput | None = None  # constrained decoding; also applies to failover resume tokens
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top-k alternatives per token; None -> off
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """One prompt to complete. `n > 1` fans out into n sequences sharing the prompt's blocks."""
    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first; FCFS within a priority
    # Prefix-cache namespace: mixed into every block hash (hashing.extra_key), so requests of
    # different salts (tenants) never share cached blocks, in the engine or the router's index.
    cache_salt: str | None = None
    # Failover: output tokens already delivered to the client by a previous replica. The engine
    # treats them as generated (they count toward max_tokens and penalties) and continues after them.
    resume_token_ids: list[list[int]] | None = None  # one list per choice index (n entries)
    # Block hashes of the prompt (replicas.engine.hashing), computed once by the router; the engine
    # recomputes them when absent.
    block_hashes: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "GenerationRequest":
        if self.resume_token_ids is not None and len(self.resume_token_ids) != self.sampling.n:
            raise ValueError("resume_token_ids needs one list per choice")
        return self


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = Field(default_factory=list)  # (token_id, token text, logprob)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationChunk(BaseModel):
    """One streamed increment for one choice. The last chunk of a choice has finish_reason set;
    the last chunk of the whole request carries usage (summed over choices)."""
    request_id: str
    index: int = 0  # choice index in [0, n)
    text: str = ""  # new text since the previous chunk of this choice (UTF-8 safe)
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Set by LLMReplica on the first chunk of each attempt only: which replica serves it (x-replica-id).
    replica_id: str | None = None


class EngineStats(BaseModel):
    """A snapshot of one engine: queues, KV pool, prefix cache and step counters (cumulative totals)."""
    num_waiting: int
    num_running: int
    pending_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int  # includes cached blocks no sequence uses (evictable)
    kv_usage: float
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    computed_tokens: int  # tokens run through the model (prefill + decode), prefix hits excluded
    steps: int
    last_step_unix: float | None


class EngineError(Exception):
    """A request the engine rejects (bad input for this model); the message is safe to show users."""
