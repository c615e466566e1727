"""The OpenAI wire schema the ingress speaks: request models (completions, chat), response and stream-chunk
models, and the one mapping from request parameters to `replicas.engine.protocol.SamplingParams`.

No field is dropped silently: a top-level field outside OpenAI's schema (and our documented extras) is a 400
naming it, as OpenAI answers; a field OpenAI defines that we do not implement is a 400 saying so (unless it
holds a value that asks for nothing, e.g. `store: false`). Nested objects (messages, content parts) stay
lenient. `None` means "default" for every optional field, since many clients send explicit nulls.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from replicas.engine.protocol import SamplingParams

MAX_STOP_STRINGS = 16  # SamplingParams' own bound; over it is a 400, not a 500
INT64 = 2**63


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _noop(*values):
    return lambda v: v in values


# OpenAI request fields we do not implement -> the values that ask for nothing (accepted). Anything else is a
# 400 "not supported" (errors.py turns the `unsupported_parameter` error into it).
UNSUPPORTED_COMMON: dict[str, Any] = {
    "service_tier": _noop("auto", "default"),
    "store": _noop(False),
    "metadata": lambda v: not v,
    "prompt_cache_key": lambda v: False,
}
UNSUPPORTED_CHAT: dict[str, Any] = {
    **UNSUPPORTED_COMMON,
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "web_search_options": lambda v: False,
    "reasoning_effort": lambda v: False,
    "verbosity": lambda v: False,
    "functions": lambda v: False,  # deprecated: `tools`
    "function_call": lambda v: False,  # deprecated: `tool_choice`
}
UNSUPPORTED_COMPLETIONS: dict[str, Any] = {
    **UNSUPPORTED_COMMON,
    "best_of": lambda v: v == 1,
    "suffix": lambda v: not v,
}


def unsupported(param: str, what: str | None = None) -> PydanticCustomError:
    """The validation error errors.py answers with a 400 "not supported" naming `param`."""
    return PydanticCustomError("unsupported_parameter", "{message}",
                               {"param": param, "message": f"{what or param} is not supported by this server"})


class _Strict(BaseModel):
    """A request body: unknown top-level fields are refused (`extra_forbidden`, a 400 naming the field)."""
    model_config = ConfigDict(extra="forbid")
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict) and cls.UNSUPPORTED:
            for name, accepts in cls.UNSUPPORTED.items():
                if data.get(name) is not None and not accepts(data[name]):
                    raise unsupported(name)
            data = {k: v for k, v in data.items() if k not in cls.UNSUPPORTED}
        return data


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    # vLLM's: every chunk carries the usage so far.
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Strict):
    """Parameters shared by completions and chat."""
    model: str | None = Field(None, description="The served model id; omitted means the served model.")
    n: int | None = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="The end user's id: written to the access log.")
    safety_identifier: str | None = Field(None, max_length=256, description="As `user`.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100], added to "
                                                "the logits before sampling.")
    # Extras beyond OpenAI (vLLM names).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="Token ids that end the choice "
                                             "(not output), as stop strings do.")
    priority: int | None = Field(None, ge=-(2**31), lt=2**31, description="Lower runs first when the replica "
                                 "is full (default 0); FCFS within a priority.")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="Prefix-cache namespace: "
                                   "requests share cached KV blocks only with requests of the same salt.")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if not v:
            return None
        if len(v) > 300:
            raise ValueError("at most 300 logit_bias entries")
        out = {}
        for k, bias in v.items():
            try:
                tok = int(k)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias}")
            out[str(tok)] = float(bias)
        return out

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def token_ids_used(self) -> list[int]:
        """Every token id the request names (logit_bias keys, stop_token_ids): the router checks the vocabulary."""
        return [int(k) for k in self.logit_bias or {}] + list(self.stop_token_ids or [])

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n or 1, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=[s for s in stop if s], ignore_eos=bool(self.ignore_eos), logprobs=logprobs,
            stop_token_ids=list(self.stop_token_ids or []),
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
        )


Prompt = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    UNSUPPORTED = UNSUPPORTED_COMPLETIONS
    prompt: Prompt = Field(description="A string, a list of strings, token ids, or a list of token-id lists.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token (0: the token only).")
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text.")

    @model_validator(mode="after")
    def _echo(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "echo with logprobs")
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.sampling_params(max_tokens, self.logprobs)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Lenient):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this result answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def template_dict(self) -> dict:
        # "developer" is OpenAI's newer name for "system"; model templates know only the latter.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class JSONSchemaFormat(_Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; omitted: no arguments
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    UNSUPPORTED = UNSUPPORTED_CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def template_messages(self) -> list[dict]:
        return [m.template_dict() for m in self.messages]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class _OptionalToolCalls(BaseModel):
    @model_serializer(mode="wrap")
    def _without_absent_tool_calls(self, handler) -> dict:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatResponseMessage(_OptionalToolCalls):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None  # left out of the JSON when there are none


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ToolCallDeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction


class ChatDelta(_OptionalToolCalls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None  # left out of the JSON when there are none


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-cluster"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
