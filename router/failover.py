"""Retries and mid-stream failover: one generation request streamed over up to `max_attempts` replicas.

Before the first token a failed replica is simply retried elsewhere (the handle's router picks another).
After it, the request is resubmitted with `resume_token_ids` = the tokens each choice already delivered;
the engine continues after them, so the client sees one unbroken stream: the chunk sequence never
repeats or skips a token. Engine errors (bad input for this model) are not retried.

The router, not the engine, counts completion tokens: after a resume, the engine's own usage does not
cover what the previous replicas produced.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from replicas.engine.protocol import EngineError, GenerationChunk, GenerationRequest
from router.errors import APIError
from router.metrics import RouterMetrics

log = logging.getLogger("llm_cluster.router")

BACKOFF_S = 0.05  # doubled per attempt: long enough for the handle to drop a dead replica, short for clients


class ReplicaFailed(APIError):
    """Every attempt failed. Before the first token this is the response (503); mid-stream, an error event."""

    def __init__(self, attempts: int, last: BaseException):
        super().__init__(503, f"no healthy replica could serve the request after {attempts} attempt(s) "
                         f"(last error: {type(last).__name__})", code="no_healthy_replica")


def _not_retryable(exc: BaseException) -> APIError | None:
    """The client-facing error for failures that another replica would not fix; None = retry."""
    if isinstance(exc, EngineError):  # also a RayTaskError wrapping one (Ray subclasses the cause)
        cause = getattr(exc, "cause", None)
        return APIError(400, str(cause if isinstance(cause, EngineError) else exc), code="invalid_request")
    try:
        from ray.serve.exceptions import BackPressureError, RequestCancelledError
    except ImportError:  # pragma: no cover - Ray is a hard dependency
        return None
    if isinstance(exc, RequestCancelledError):
        raise asyncio.CancelledError() from exc
    if isinstance(exc, BackPressureError):
        return APIError(429, "replicas are at capacity, retry later", code="overloaded", headers={"Retry-After": "1"})
    return None


class ResumableGeneration:
    """Streams one GenerationRequest's chunks, failing over between replicas.

    `delivered[i]` holds choice i's tokens already yielded; `finished[i]` whether its last chunk went out.
    """

    def __init__(self, replicas: Any, request: GenerationRequest, *, max_attempts: int,
                 metrics: "RouterMetrics | None" = None, backoff_s: float = BACKOFF_S):
        self.replicas = replicas
        self.request = request
        self.max_attempts = max_attempts
        self.metrics = metrics
        self.backoff_s = backoff_s
        n = request.sampling.n
        self.delivered: list[list[int]] = [[] for _ in range(n)]
        self.finished = [False] * n
        self.cached_tokens = 0
        self.attempts = 0
        self.replica_id: str | None = None  # the replica serving the latest attempt that sent a chunk

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(d) for d in self.delivered)

    def _attempt_request(self) -> GenerationRequest:
        if self.attempts == 1:
            return self.request
        resume = None
        if any(self.delivered):
            # n > 1: a choice that already finished is re-run and its chunks dropped (the index must stay
            # for seeded sampling); the engine refuses a resume that leaves nothing to generate.
            room = self.request.sampling.max_tokens - 1
            resume = [list(d[:room]) if done else list(d) for d, done in zip(self.delivered, self.finished)]
        return self.request.model_copy(update={"request_id": f"{self.request.request_id}-{self.attempts}",
                                               "resume_token_ids": resume})

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        while True:
            self.attempts += 1
            stream = None
            done = False
            try:
                stream = self.replicas.options(stream=True).generate.remote(self._attempt_request())
                async for chunk in stream:
                    if chunk.replica_id is not None:
                        self.replica_id = chunk.replica_id
                    if chunk.usage is not None:
                        # A resumed attempt's "prompt" includes the resumed tokens: cap at the real prompt.
                        self.cached_tokens = min(chunk.usage.cached_prompt_tokens, self.prompt_tokens)
                    i = chunk.index
                    if self.finished[i]:
                        continue  # finished before a failover; the new replica re-ran it
                    self.delivered[i].extend(chunk.token_ids)
                    if chunk.finish_reason == "abort":
                        # The replica gave the request up (e.g. shutting down): continue elsewhere.
                        chunk = chunk.model_copy(update={"finish_reason": None})
                        if chunk.token_ids or chunk.text:
                            yield chunk
                        raise _Aborted()
                    self.finished[i] = chunk.finish_reason is not None
                    yield chunk
                done = True
                return
            except Exception as exc:  # noqa: BLE001 - classified below; CancelledError passes through
                fatal = _not_retryable(exc)
                if fatal is not None:
                    raise fatal from None
                if all(self.finished):
                    done = True
                    return  # the replica died after the last token: nothing is missing
                mid_stream = any(self.delivered)
                log.warning("request %s: replica failed (%s: %s), attempt %d/%d%s", self.request.request_id,
                            type(exc).__name__, exc, self.attempts, self.max_attempts,
                            ", mid-stream" if mid_stream else "")
                exhausted = self.attempts >= self.max_attempts
                if self.metrics is not None:
                    if mid_stream:
                        self.metrics.failover("exhausted" if exhausted else "resumed")
                    elif not exhausted:
                        self.metrics.retry(_reason(exc))
                if exhausted:
                    raise ReplicaFailed(self.attempts, exc) from None
            finally:
                if stream is not None and not done:
                    # Client gone, error, or abort: make the replica drop the request and free its blocks.
                    _cancel(stream)
            await asyncio.sleep(self.backoff_s * 2 ** (self.attempts - 1))


class _Aborted(Exception):
    pass


def _reason(exc: BaseException) -> str:
    """The llmc_request_retries_total reason (replicas.metrics RETRY_REASONS)."""
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    if isinstance(exc, ActorDiedError):
        return "replica_died"
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, _Aborted)):
        return "replica_unavailable"
    return "error"


def _cancel(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # noqa: BLE001 - best effort; the replica may already be gone
            log.debug("cancel failed", exc_info=True)
