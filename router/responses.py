"""Engine chunks -> OpenAI responses: SSE stream events (one choice per event, interleaved as they come,
an optional usage event, then `data: [DONE]`) or one aggregated response; logprobs in OpenAI's two
formats (completions: parallel lists; chat: per-token objects).
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable

from replicas.protocol import GenerationChunk, TokenLogprob
from router.errors import APIError, internal_error, sse_error_event
from router.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                             ChatDelta, ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, CompletionChoice,
                             CompletionChunk, CompletionLogprobs, CompletionResponse, TopLogprob, UsageInfo)

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
                        yield self._event(index, chunk, usage() if self.continuous_usage else None)
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
    def _opening(self) -> list[str]:
        # OpenAI opens every choice with the assistant role and empty content.
        return [sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]))
            for i in range(self.num_choices)]

    def _event(self, index: int, chunk: GenerationChunk, usage: UsageInfo | None = None) -> str:
        lp = ChatLogprobs(content=_chat_logprobs(chunk.logprobs)) if self.logprobs else None
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChunkChoice(index=index, delta=ChatDelta(content=chunk.text), logprobs=lp,
                            finish_reason=chunk.finish_reason)]))

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
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage(), choices=[
            ChatChoice(index=i, message=ChatResponseMessage(content="".join(texts[i])), logprobs=lps[i],
                       finish_reason=finish[i]) for i in range(self.num_choices)])


def _chat_logprobs(items: list[TokenLogprob] | None) -> list[ChatTokenLogprob]:
    return [ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                             top_logprobs=[TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))
                                           for _, tok, lp in t.top]) for t in items or ()]
