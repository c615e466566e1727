"""What one request measured (RequestResult) and the aggregate of a run (Summary): throughput,
goodput under an SLO, latency percentiles, cache hit rate, error counts, per-replica load."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Error kind of a request cut off by the run's deadline: counted apart from server failures.
DEADLINE = "deadline"


class RequestResult(BaseModel):
    id: str
    session_id: str
    turn: int = 0
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None  # kind: "http_500", "http_429", "timeout", "stream_error", "deadline", an exception name
    error_detail: str | None = None
    scheduled_s: float  # when the workload wanted it sent, from run start
    start_s: float  # when it was sent, from run start
    ttft_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)  # gaps between streamed content chunks
    tpot_s: float | None = None  # (last token - first token) / (output tokens - 1)
    e2e_s: float | None = None  # send to end of stream
    output_tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    request_id: str | None = None  # x-request-id
    replica_id: str | None = None  # x-replica-id

    @property
    def ok(self) -> bool:
        return self.error is None


class SLO(BaseModel):
    """A request is good when it succeeded and meets every bound that is set."""
    model_config = ConfigDict(extra="forbid")

    ttft_s: float | None = Field(None, gt=0)
    tpot_s: float | None = Field(None, gt=0)

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_s is not None and (r.ttft_s is None or r.ttft_s > self.ttft_s):
            return False
        # One-token answers have no TPOT: nothing to violate.
        return self.tpot_s is None or r.tpot_s is None or r.tpot_s <= self.tpot_s


class Percentiles(BaseModel):
    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles | None":
        if not values:
            return None
        a = np.asarray(values, dtype=float)
        p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
        return cls(count=len(a), mean=float(a.mean()), p50=float(p50), p90=float(p90), p95=float(p95),
                   p99=float(p99), max=float(a.max()))


class ReplicaLoad(BaseModel):
    requests: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0


class Summary(BaseModel):
    sent: int
    ok: int
    failed: int  # server or transport errors
    cancelled: int  # cut off by the deadline
    errors: dict[str, int]  # error kind -> count, deadline included
    duration_s: float
    request_throughput: float  # successful req/s
    output_throughput: float  # output tok/s of successful requests
    goodput: float  # req/s meeting the SLO
    slo: SLO
    slo_attainment: float | None  # good / sent
    ttft_s: Percentiles | None
    itl_s: Percentiles | None
    tpot_s: Percentiles | None
    e2e_s: Percentiles | None
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    cache_hit_rate: float | None  # cached / prompt tokens over requests that reported both
    replicas: dict[str, ReplicaLoad]  # by x-replica-id; empty when the server does not say
    max_over_mean_load: float | None  # busiest replica's requests / mean (1.0 = perfectly even)


def summarize(results: list[RequestResult], duration_s: float, slo: SLO | None = None) -> Summary:
    slo = slo or SLO()
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    cancelled = errors.get(DEADLINE, 0)
    duration = max(duration_s, 1e-9)
    with_usage = [r for r in ok if r.prompt_tokens is not None and r.cached_tokens is not None]
    prompt_tokens = sum(r.prompt_tokens for r in with_usage)
    cached_tokens = sum(r.cached_tokens for r in with_usage)
    replicas: dict[str, ReplicaLoad] = {}
    for r in ok:
        if r.replica_id is not None:
            load = replicas.setdefault(r.replica_id, ReplicaLoad())
            load.requests += 1
            load.output_tokens += r.output_tokens
            load.prompt_tokens += r.prompt_tokens or 0
    counts = [v.requests for v in replicas.values()]
    good = sum(slo.met(r) for r in results)
    return Summary(
        sent=len(results), ok=len(ok), failed=len(results) - len(ok) - cancelled, cancelled=cancelled,
        errors=errors, duration_s=duration_s,
        request_throughput=len(ok) / duration, output_throughput=sum(r.output_tokens for r in ok) / duration,
        goodput=good / duration, slo=slo, slo_attainment=good / len(results) if results else None,
        ttft_s=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_s=Percentiles.of([x for r in ok for x in r.itl_s]),
        tpot_s=Percentiles.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e_s=Percentiles.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        prompt_tokens=prompt_tokens, output_tokens=sum(r.output_tokens for r in ok), cached_tokens=cached_tokens,
        cache_hit_rate=cached_tokens / prompt_tokens if prompt_tokens else None,
        replicas=dict(sorted(replicas.items())),
        max_over_mean_load=max(counts) / (sum(counts) / len(counts)) if counts else None,
    )
