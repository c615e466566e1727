"""The OpenAI-compatible HTTP surface: `OpenAIRouter` (the FastAPI app and what each endpoint does) and
`OpenAIIngress`, its Ray Serve ingress deployment.

Per generation request: validate -> tokenize (chat template) and hash blocks -> admission -> one
`ResumableGeneration` per prompt (failover) -> merge their chunks -> SSE stream or one JSON response.
The first chunk is awaited before any response starts, so failures before the first token still get a
proper status code; after it they end the stream with an error event. A stream whose first chunk takes longer
than `router.sse_keepalive_s` starts anyway and sends SSE comments until it comes (idle proxies would cut it);
an error before the first token then ends it with the error event too. Responses name the serving replica in
`x-replica-id` (a stream: the replica of its first chunk, as headers leave before any mid-stream failover;
none on a stream that started before its first chunk).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from replicas.engine.protocol import GenerationRequest, SamplingParams
from replicas.protocol import ReplicaInfo
from router.admission import Admission, Ticket
from router.auth import ApiKeys
from router.config import IngressConfig
from router.errors import ERROR_TYPES, APIError, bad_request, install_error_handlers
from router.failover import ResumableGeneration
from router.metrics import CONTENT_TYPE, RouterMetrics, request_status
from router.middleware import Gatekeeper
from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    VersionResponse,
    _SamplingFields,
)
from router.responses import KEEPALIVE, ChatFormatter, CompletionFormatter, IndexedChunks, _Formatter, broken_stream_end
from router.shared_load import LoadCancelled, SharedLoad
from router.structured import response_format_output
from router.tokenization import PromptPreparer
from router.tools import template_messages, tool_mode

log = logging.getLogger("llm_cluster.router")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MODEL_INFO_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 2.0
LARGE_BODY_BYTES = 32 * 1024
REPLICA_ID_HEADER = "x-replica-id"
_ERROR_RESPONSES = {s: {"description": t} for s, t in ERROR_TYPES.items() if s in (400, 401, 404, 413, 429, 503)}


class OpenAIRouter:
    """Owns the FastAPI app (`.app`) for one ingress instance; `replicas` is the LLMReplica handle."""

    def __init__(self, config: IngressConfig, replicas: Any):
        self.config = config
        self.replicas = replicas
        self.keys = ApiKeys.from_config(config.router)
        self.keys.announce()
        self.metrics = RouterMetrics(config.engine.served_model_id, ray=ray.is_initialized())
        self.admission = Admission(config.router.max_queued_requests, config.router.num_router_replicas)
        self._in_flight = 0
        self._preparer_load: SharedLoad[PromptPreparer] = SharedLoad(self._load_preparer, "tokenizer")
        self._active_ids: set[str] = set()
        self.app = self._build_app()

    # ------------------------------------------------------------------ model

    async def _model_info(self, timeout: float) -> ReplicaInfo:
        response = self.replicas.model_info.remote()
        try:
            return await asyncio.wait_for(_awaited(response), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - timeout, dead replica, no replica: all mean "not ready"
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise APIError(503, f"no healthy replica answered ({type(e).__name__})",
                           code="no_healthy_replica") from None

    @property
    def _preparer(self) -> PromptPreparer | None:
        return self._preparer_load.value

    async def preparer(self, info: ReplicaInfo | None = None) -> PromptPreparer:
        """Tokenizer and model limits, from the first replica that answers; loaded once (`SharedLoad`:
        a probe that gives up neither cancels the load nor breaks it for later callers)."""
        try:
            return await self._preparer_load.get(info)
        except LoadCancelled:
            raise APIError(503, "the model's tokenizer is still loading, retry", code="no_healthy_replica",
                           headers={"Retry-After": "1"}) from None

    def preload(self) -> None:
        """Load the tokenizer now, before the first request (which would otherwise pay for it)."""
        self._preload_task = self._preparer_load.start_in_background()

    async def _load_preparer(self, info: ReplicaInfo | None) -> PromptPreparer:
        # Long enough for a cold start from zero replicas; /ready answers fast on its own timeout.
        info = info or await self._model_info(MODEL_INFO_TIMEOUT_S)
        preparer = await asyncio.to_thread(PromptPreparer, info)
        log.info("serving model %s (context %d, block size %d)", preparer.info.model_id,
                 preparer.info.max_model_len, preparer.info.block_size)
        return preparer

    @staticmethod
    def _check_model(requested: str | None, p: PromptPreparer) -> None:
        if requested is not None and requested != p.info.model_id:
            raise APIError(404, f"model {requested!r} does not exist; this server serves {p.info.model_id!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ endpoints

    @staticmethod
    def _common(body: _SamplingFields, request: Request, p: PromptPreparer) -> None:
        """Checks and bookkeeping every generation request shares."""
        OpenAIRouter._check_model(body.model, p)
        p.check_token_ids([int(t) for t in body.logit_bias or {}], "logit_bias")
        p.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        request.state.user = body.user or body.safety_identifier

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        p = await self.preparer()
        self._common(body, request, p)
        prompts = await _off_loop_if_large(request, p.completion_prompts, body.prompt)
        specs = [(ids, body.sampling(p.max_tokens(len(ids), body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)),
                  p.block_hashes(ids, body.cache_salt)) for ids in prompts]
        n = body.n or 1
        echo = None
        if body.echo:
            if isinstance(body.prompt, str):
                texts = [body.prompt]
            elif isinstance(body.prompt[0], str):
                texts = list(body.prompt)
            else:  # token ids
                texts = [p.tokenizer.decode(ids) for ids in prompts]
            echo = [texts[k // n] for k in range(len(specs) * n)]
        fmt = lambda rid: CompletionFormatter(  # noqa: E731
            f"cmpl-{rid}", p.info.model_id, len(specs) * n, logprobs=body.logprobs is not None,
            include_usage=body.include_usage, continuous_usage=body.continuous_usage, echo=echo)
        return await self._serve(request, specs, fmt, bool(body.stream), priority=body.priority or 0,
                                 cache_salt=body.cache_salt)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        p = await self.preparer()
        self._common(body, request, p)
        tools, tool_grammar = tool_mode(body, p.tool_format)
        if tool_grammar is not None and body.response_format is not None and body.response_format.type != "text":
            raise bad_request("response_format cannot be combined with tool_choice required or a named function",
                              param="response_format")
        messages, template_kw = template_messages(body, p.tokenizer, render_tools=tools is not None)
        ids = await _off_loop_if_large(request, lambda m: p.encode_chat(m, **template_kw), messages)
        p.check_ids(ids)
        sampling = body.sampling(p.max_tokens(len(ids), body.requested_max_tokens(), None))
        structured = tool_grammar or response_format_output(body.response_format)
        if structured is not None:
            sampling = sampling.model_copy(update={"structured": structured})
        specs = [(ids, sampling, p.block_hashes(ids, body.cache_salt))]
        fmt = lambda rid: ChatFormatter(  # noqa: E731
            f"chatcmpl-{rid}", p.info.model_id, body.n or 1, logprobs=bool(body.logprobs),
            include_usage=body.include_usage, continuous_usage=body.continuous_usage, tools=tools)
        return await self._serve(request, specs, fmt, bool(body.stream), priority=body.priority or 0,
                                 cache_salt=body.cache_salt)

    async def models(self) -> ModelList:
        p = await self.preparer()
        return ModelList(data=[self._card(p)])

    @staticmethod
    def _card(p: PromptPreparer) -> ModelCard:
        return ModelCard(id=p.info.model_id, created=int(time.time()), max_model_len=p.info.max_model_len)

    async def model(self, model_id: str) -> ModelCard:
        p = await self.preparer()
        self._check_model(model_id, p)
        return self._card(p)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        p = await self.preparer()
        self._check_model(body.model, p)
        if body.messages is not None:
            ids = p.encode_chat([m.template_dict() for m in body.messages],
                                add_generation_prompt=body.add_generation_prompt)
        else:
            ids = p.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=p.info.max_model_len, tokens=ids)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        p = await self.preparer()
        self._check_model(body.model, p)
        if body.tokens:
            p.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=p.tokenizer.decode(body.tokens))

    async def ready(self) -> JSONResponse:
        info = await self._model_info(READY_TIMEOUT_S)
        await self.preparer(info)
        return JSONResponse({"status": "ready", "model": info.model_id})

    # ------------------------------------------------------------------ serving one request

    def _claim_id(self, rid: str) -> str:
        # A client reusing an id for concurrent requests must not make two engine requests collide.
        if rid in self._active_ids:
            rid = f"{rid}-{time.monotonic_ns():x}"
        self._active_ids.add(rid)
        return rid

    async def _serve(self, request: Request, specs: list[tuple[list[int], SamplingParams, list[int]]],
                     make_fmt: Callable[[str], _Formatter], stream: bool, *, priority: int = 0,
                     cache_salt: str | None = None) -> Response:
        ticket = self.admission.admit()
        rid = self._claim_id(request.state.request_id)
        try:
            reqs = [GenerationRequest(request_id=rid if len(specs) == 1 else f"{rid}-p{k}", prompt_token_ids=ids,
                                      sampling=sampling, block_hashes=hashes, priority=priority,
                                      cache_salt=cache_salt)
                    for k, (ids, sampling, hashes) in enumerate(specs)]
            gens = [ResumableGeneration(self.replicas, r, max_attempts=self.config.router.max_attempts,
                                        metrics=self.metrics) for r in reqs]
            fmt = make_fmt(rid)
        except BaseException:
            ticket.release()
            self._active_ids.discard(rid)
            raise
        usage = lambda: _usage(gens)  # noqa: E731
        # _observed's cleanup releases the ticket and the id once the generator has started (next line).
        chunks = self._observed(_merged(gens, reqs[0].sampling.n), gens, ticket, rid, request)
        if stream:
            return await self._stream(chunks, fmt, usage, gens)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        chunks = _prepend(first, chunks)
        try:
            result = await fmt.aggregate(chunks, usage)
        finally:
            await chunks.aclose()
        return Response(result.model_dump_json(), media_type="application/json", headers=_replica_header(gens))

    async def _stream(self, chunks: IndexedChunks, fmt: _Formatter, usage: Callable[[], UsageInfo],
                      gens: list[ResumableGeneration]) -> Response:
        """The SSE response. A first chunk within `router.sse_keepalive_s` behaves as a non-streaming request's:
        an error before it still gets its status code, and `x-replica-id` names the replica that sent it
        (headers leave before any mid-stream failover). A request still waiting then (queued behind others)
        starts its 200 response without `x-replica-id` (no replica has answered yet) and sends SSE comments
        until the chunk comes: a proxy's idle timeout would otherwise cut it."""
        # A task, so that waiting with a timeout does not cancel the generator; it runs only the first step.
        # Its first step is queued before any wake-up of ours, so a cancelled request finds the generator
        # started: cancelling the task then runs _observed's cleanup (see _abandon).
        pending = asyncio.create_task(_first_chunk(chunks))
        pending.add_done_callback(_retrieved)
        try:
            await asyncio.wait({pending}, timeout=self.config.router.sse_keepalive_s)
        except BaseException:
            await _abandon(pending, chunks)
            raise
        if not pending.done():
            return _ClosingStreamingResponse(
                _keepalive_stream(pending, chunks, fmt, usage, self.config.router.sse_keepalive_s),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            first = pending.result()
        except BaseException:
            await chunks.aclose()
            raise
        return _ClosingStreamingResponse(fmt.stream(_prepend(first, chunks), usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", **_replica_header(gens)})

    async def _observed(self, chunks: IndexedChunks, gens: list[ResumableGeneration], ticket: Ticket,
                        rid: str, request: Request) -> IndexedChunks:
        """Request metrics on the way through; releases the admission slot and records usage at the end."""
        request.state.observed = True  # llmc_requests_total comes from here, with the final status
        obs = self.metrics.observer(request.state.t0)
        status = "error"
        self._in_flight += 1
        self.metrics.load(self.admission.queued, self._in_flight)
        try:
            async for index, chunk in chunks:
                if ticket.queued:
                    ticket.started()
                    self.metrics.load(self.admission.queued, self._in_flight)
                obs.tokens(len(chunk.token_ids))
                yield index, chunk
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = request_status(cancelled=True)
            raise
        except APIError as e:
            status = request_status(e.status)
            raise
        finally:
            await chunks.aclose()
            ticket.release()
            self._in_flight -= 1
            self._active_ids.discard(rid)
            self.metrics.load(self.admission.queued, self._in_flight)
            u = _usage(gens)
            obs.finish(status, u.prompt_tokens, u.completion_tokens)
            st = request.state
            st.prompt_tokens, st.completion_tokens = u.prompt_tokens, u.completion_tokens
            st.cached_tokens, st.attempts = u.prompt_tokens_details.cached_tokens, max(g.attempts for g in gens)

    # ------------------------------------------------------------------ app

    def _build_app(self) -> Any:
        app = FastAPI(title="llm-cluster", version="0.1.0", openapi_url="/openapi.json",
                      description="OpenAI-compatible API of an llm-cluster deployment.")
        install_error_handlers(app)

        @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
        async def completions(body: CompletionRequest, request: Request):
            return await self.completions(body, request)

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
        async def chat_completions(body: ChatCompletionRequest, request: Request):
            return await self.chat(body, request)

        @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
        async def models():
            return await self.models()

        @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
        async def model(model_id: str):
            return await self.model(model_id)

        @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
        async def tokenize(body: TokenizeRequest):
            return await self.tokenize(body)

        @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
        async def detokenize(body: DetokenizeRequest):
            return await self.detokenize(body)

        @app.get("/version", response_model=VersionResponse)
        async def version():
            return VersionResponse(version=_version())

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/ready", responses={503: {"description": "no replica answers"}})
        async def ready():
            return await self.ready()

        @app.get("/metrics", response_class=Response)
        async def metrics():
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        app.add_middleware(Gatekeeper, keys=self.keys, max_body_bytes=self.config.router.max_body_bytes,
                           metrics=self.metrics)
        return app


@serve.ingress()
class OpenAIIngress:
    """The Serve ingress deployment; its options are set in `cluster.app`."""

    def __init__(self, config: IngressConfig, replicas: Any):
        self.router = OpenAIRouter(config, replicas)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # constructed outside Serve's event loop: loads at the first request
            return
        self.router.preload()

    def __serve_build_asgi_app__(self):
        return self.router.app

    async def redis_routing(self):
        """`llm-cluster status` asks every ingress replica (handle broadcast): the request routers of this
        process on Redis (lookup failures, fallbacks, breaker), a router.replica_choice.RedisRoutingStats."""
        stats = self.router.metrics.redis_routing()
        try:
            rid = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 — constructed outside Serve (tests): no replica id
            return stats
        return stats.model_copy(update={"replica_id": rid})


# ---------------------------------------------------------------------- helpers


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llm-cluster")
    except PackageNotFoundError:
        return "unknown"


async def _awaited(x):
    return await x


async def _off_loop_if_large(request: Request, fn: Callable, arg):
    # Tokenizing a long prompt takes milliseconds to seconds: off the event loop every stream shares.
    # Short ones stay inline, where a thread hop would cost more than the work.
    if int(request.headers.get("content-length") or 0) > LARGE_BODY_BYTES:
        return await asyncio.to_thread(fn, arg)
    return fn(arg)


def _replica_header(gens: list[ResumableGeneration]) -> dict[str, str]:
    """x-replica-id: the replica each prompt's generation is on now (in prompt order, without repeats)."""
    ids = ",".join(dict.fromkeys(g.replica_id for g in gens if g.replica_id))
    return {REPLICA_ID_HEADER: ids} if ids else {}


def _usage(gens: list[ResumableGeneration]) -> UsageInfo:
    return UsageInfo.of(sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens),
                        sum(g.cached_tokens for g in gens))


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _first_chunk(chunks: IndexedChunks):
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


def _retrieved(task: asyncio.Task) -> None:
    # An error nobody streamed (the client left first) is not worth asyncio's "never retrieved" warning.
    if not task.cancelled():
        task.exception()


_abandoned: set[asyncio.Task] = set()  # cancelled first-chunk tasks still cleaning up: the loop holds only weak refs


async def _abandon(pending: asyncio.Task, chunks: IndexedChunks) -> None:
    """Ends a stream whose first chunk is (or was) awaited in `pending` and never sent."""
    if pending.done():
        await chunks.aclose()
        return
    # The generator runs inside `pending` (closing it from here would fail): cancelling the task runs
    # _observed's cleanup there, which cancels the replica call (freeing the request's KV blocks) and
    # releases the admission slot. The cancel is synchronous, so it holds even when the await below is
    # cancelled too (Starlette's disconnect listener cancels again until the response task ends).
    pending.cancel()
    _abandoned.add(pending)
    pending.add_done_callback(_abandoned.discard)
    await asyncio.wait({pending})


async def _keepalive_stream(pending: asyncio.Task, chunks: IndexedChunks, fmt: _Formatter,
                            usage: Callable[[], UsageInfo], interval: float) -> AsyncIterator[str]:
    """The body of a stream that started before its first chunk: an SSE comment now and every `interval`
    until the chunk comes, then the formatter's events. An error before the first token can no longer
    change the status code: it ends the stream as a mid-stream failure does (error event, `data: [DONE]`).
    Each comment is also a write that notices a client gone away (ASGI 2.4 tells only through send)."""
    try:
        yield KEEPALIVE
        while not (await asyncio.wait({pending}, timeout=interval))[0]:
            yield KEEPALIVE
        try:
            first = pending.result()
        except Exception as exc:  # noqa: BLE001 - becomes the stream's error event
            for event in broken_stream_end(exc, fmt.id):
                yield event
            return
        events = fmt.stream(_prepend(first, chunks), usage)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
    finally:
        await _abandon(pending, chunks)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends: Starlette leaves it suspended when the client
    goes away, and only its closing cancels the replica call (freeing the request's KV blocks)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


_END = object()


async def _merged(gens: list[ResumableGeneration], n: int) -> IndexedChunks:
    """Chunks of all prompts' generations as they come; prompt k's choice i is response choice k*n+i."""
    if len(gens) == 1:
        it = gens[0].__aiter__()
        try:
            async for chunk in it:
                yield chunk.index, chunk
        finally:
            await it.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, gen: ResumableGeneration) -> None:
        try:
            async for chunk in gen:
                await queue.put((k * n + chunk.index, chunk))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
            return
        await queue.put(_END)

    tasks = [asyncio.create_task(pump(k, g)) for k, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
