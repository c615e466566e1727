"""Engine chunks -> OpenAI responses: SSE stream events (one choice per event, interleaved as they come,
an optional usage event, then `data: [DONE]`) or one aggregated response; logprobs in OpenAI's two
formats (completions: parallel lists; chat: per-token objects).
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable

from replicas.engine.protocol import GenerationChunk, TokenLogprob
from router.errors import APIError, internal_error, sse_error_event
from router.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    ToolCall,
    ToolCallDelta,
    ToolCallDeltaFunction,
    ToolCallFunction,
    TopLogprob,
    UsageInfo,
)
from router.tools import ToolMode, call_id, may_start_call

log = logging.getLogger("llm_cluster.router")

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it; it only keeps idle connections alive
IndexedChunks = AsyncIterator[tuple[int, GenerationChunk]]  # (choice index in the response, chunk)


def sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def broken_stream_end(exc: Exception, response_id: str) -> list[str]:
    """The last events of a stream that cannot go on: the error event, then `data: [DONE]`. An APIError (every
    replica failed, a rejected request) is shown as it is; anything else is a bug of ours: logged, and shown
    as an internal error, so clients still see the documented shape."""
    if not isinstance(exc, APIError):
        log.error("stream %s failed", response_id, exc_info=exc)
        exc = internal_error()
    return [sse_error_event(exc), DONE]


class _Formatter:
    def __init__(self, response_id: str, model: str, num_choices: int, logprobs: bool, include_usage: bool,
                 continuous_usage: bool = False):
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.num_choices = num_choices
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # every event carries the usage so far (vLLM's stream option)

    async def stream(self, chunks: IndexedChunks, usage: Callable[[], UsageInfo]) -> AsyncIterator[str]:
        try:
            try:
                for event in self._opening():
                    yield event
                async for index, chunk in chunks:
                    if chunk.text or chunk.token_ids or chunk.finish_reason:
                        for event in self._events(index, chunk, usage() if self.continuous_usage else None):
                            yield event
            except Exception as exc:  # every replica failed mid-stream, or a bug of ours: end it cleanly
                for event in broken_stream_end(exc, self.id):
                    yield event
                return
            if self.include_usage:
                yield self._usage_event(usage())
            yield DONE
        finally:
            await chunks.aclose()  # stopped early (client gone, error): the replica call is cancelled

    def _opening(self) -> list[str]:
        return []

    def _events(self, index: int, chunk: GenerationChunk, usage: UsageInfo | None) -> list[str]:
        return [self._event(index, chunk, usage)]


class CompletionFormatter(_Formatter):
    def __init__(self, *args, echo: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._offsets = [0] * self.num_choices  # text_offset of each choice's next token
        # echo: each choice's prompt text, put before its first text (streamed: in its first event)
        self._echo = dict(enumerate(echo)) if echo else {}

    def _event(self, index: int, chunk: GenerationChunk, usage: UsageInfo | None = None) -> str:
        lp = self._logprobs(index, chunk.logprobs, CompletionLogprobs()) if self.logprobs else None
        text = self._echo.pop(index, "") + chunk.text
        return sse(CompletionChunk(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=chunk.finish_reason)]))

    def _usage_event(self, usage: UsageInfo) -> str:
        return sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))

    async def aggregate(self, chunks: IndexedChunks, usage: Callable[[], UsageInfo]) -> CompletionResponse:
        texts: list[list[str]] = [[] for _ in range(self.num_choices)]
        lps = [CompletionLogprobs() if self.logprobs else None for _ in range(self.num_choices)]
        finish: list[str | None] = [None] * self.num_choices
        async for index, chunk in chunks:
            texts[index].append(chunk.text)
            if lps[index] is not None:
                self._logprobs(index, chunk.logprobs, lps[index])
            finish[index] = chunk.finish_reason or finish[index]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage(), choices=[
            CompletionChoice(index=i, text=self._echo.get(i, "") + "".join(texts[i]), logprobs=lps[i],
                             finish_reason=finish[i])
            for i in range(self.num_choices)])

    def _logprobs(self, index: int, items: list[TokenLogprob] | None, out: CompletionLogprobs) -> CompletionLogprobs:
        for t in items or ():
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append({tok: lp for _, tok, lp in t.top})
            out.text_offset.append(self._offsets[index])
            self._offsets[index] += len(t.token)
        return out


class ChatFormatter(_Formatter):
    """Chat responses; with `tools` (router.tools.ToolMode) the output becomes tool calls: a named function's
    arguments stream as they come, other modes hold back text that may start a call and send each call whole
    once the choice ends."""

    def __init__(self, *args, tools: ToolMode | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = tools
        self._text = [""] * self.num_choices  # with tools: each choice's output so far
        self._sent = [0] * self.num_choices  # chars of it streamed as content (auto) or arguments (named)

    def _opening(self) -> list[str]:
        # OpenAI opens every choice with the assistant role and empty content.
        return [sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]))
            for i in range(self.num_choices)]

    def _event(self, index: int, chunk: GenerationChunk, usage: UsageInfo | None = None,
               delta: ChatDelta | None = None, finish: str | None = None) -> str:
        lp = ChatLogprobs(content=_chat_logprobs(chunk.logprobs)) if self.logprobs else None
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChunkChoice(index=index, delta=delta or ChatDelta(content=chunk.text), logprobs=lp,
                            finish_reason=finish or chunk.finish_reason)]))

    def _events(self, index: int, chunk: GenerationChunk, usage: UsageInfo | None) -> list[str]:
        t = self.tools
        if t is None:
            return [self._event(index, chunk, usage)]
        self._text[index] += chunk.text
        text, sent = self._text[index], self._sent[index]
        if t.choice == "named":
            self._sent[index] = len(text)
            first = sent == 0 and text
            call = ToolCallDelta(index=0, id=call_id() if first else None, type="function" if first else None,
                                 function=ToolCallDeltaFunction(name=t.name if first else None,
                                                                arguments=text[sent:]))
            finish = "tool_calls" if chunk.finish_reason == "stop" else chunk.finish_reason
            if not text[sent:] and not first:
                return [self._event(index, chunk, usage, ChatDelta(), finish)] if finish else []
            return [self._event(index, chunk, usage, ChatDelta(tool_calls=[call]), finish)]
        if chunk.finish_reason is None:
            if t.choice == "auto":  # stream content up to where a call may begin
                cut = sent + may_start_call(t.fmt, text[sent:])
                if cut > sent:
                    self._sent[index] = cut
                    return [self._event(index, chunk, usage, ChatDelta(content=text[sent:cut]))]
            return []
        content, calls = t.finish(text)
        if not calls:
            return [self._event(index, chunk, usage, ChatDelta(content=text[sent:]))]
        out = []
        rest = (content or "")[sent:] if content and len(content) > sent else ""
        if rest:
            out.append(self._event(index, chunk.model_copy(update={"finish_reason": None, "logprobs": None}), None,
                                   ChatDelta(content=rest)))
        deltas = [ToolCallDelta(index=k, id=c.id, type="function",
                                function=ToolCallDeltaFunction(name=c.name, arguments=c.arguments))
                  for k, c in enumerate(calls)]
        out.append(self._event(index, chunk, usage, ChatDelta(tool_calls=deltas), "tool_calls"))
        return out

    def _usage_event(self, usage: UsageInfo) -> str:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                       usage=usage))

    async def aggregate(self, chunks: IndexedChunks, usage: Callable[[], UsageInfo]) -> ChatCompletionResponse:
        texts: list[list[str]] = [[] for _ in range(self.num_choices)]
        lps = [ChatLogprobs() if self.logprobs else None for _ in range(self.num_choices)]
        finish: list[str | None] = [None] * self.num_choices
        async for index, chunk in chunks:
            texts[index].append(chunk.text)
            if lps[index] is not None:
                lps[index].content.extend(_chat_logprobs(chunk.logprobs))
            finish[index] = chunk.finish_reason or finish[index]
        choices = []
        for i in range(self.num_choices):
            text, reason = "".join(texts[i]), finish[i]
            message = ChatResponseMessage(content=text)
            if self.tools is not None and (reason == "stop" or self.tools.choice == "named"):
                content, calls = self.tools.finish(text)
                if calls:
                    message = ChatResponseMessage(content=content, tool_calls=[
                        ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments))
                        for c in calls])
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append(ChatChoice(index=i, message=message, logprobs=lps[i], finish_reason=reason))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage(),
                                      choices=choices)


def _chat_logprobs(items: list[TokenLogprob] | None) -> list[ChatTokenLogprob]:
    return [ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                             top_logprobs=[TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))
                                           for _, tok, lp in t.top]) for t in items or ()]
