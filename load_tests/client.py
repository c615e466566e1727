"""The async load client: sends a workload's request specs to an OpenAI-compatible server over
streaming HTTP (SSE parsed by hand) and measures each request (TTFT, inter-token gaps, TPOT,
end-to-end latency, tokens, cached tokens, status) and the run (load_tests.metrics.Summary).

Open loop (poisson / fixed_rate arrivals) sends each spec at its arrival time; closed loop keeps
`concurrency` requests in flight. A multi-turn spec waits for its previous turn and is sent with
that turn's real answer in place of the placeholder. A run is bounded by max_requests and a
deadline: at the deadline requests in flight are cut off (error "deadline") and the run returns.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from load_tests.metrics import DEADLINE, SLO, RequestResult, Summary, summarize
from load_tests.sampler import StatusSampler, StatusSource, TimePoint
from load_tests.target import check_target
from load_tests.workloads import RequestSpec, Workload


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str | None = None  # None -> the first id from GET /v1/models
    max_requests: int = Field(10_000, ge=1)  # the first max_requests specs of the workload
    deadline_s: float = Field(600.0, gt=0)  # whole run
    request_timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    temperature: float | None = None  # left to the server when None
    api_key: str | None = None
    allow_remote: bool = False
    slo: SLO = Field(default_factory=SLO)
    progress: bool | None = None  # None -> on for runs of 50+ requests when stderr is a terminal
    status_interval_s: float = Field(1.0, gt=0)
    # OpenAI ends a stream with `data: [DONE]`; `transformers serve` just closes it after the last chunk.
    require_done: bool = True


class RunResult(BaseModel):
    started_at: str
    url: str
    model: str
    workload: dict  # the workload config
    arrival_kind: str
    offered_load: float  # req/s for open loop, concurrency for closed loop
    results: list[RequestResult]
    summary: Summary
    timeseries: list[TimePoint] = Field(default_factory=list)
    status_errors: int = 0


class _Measure:
    """Timestamps of one request as its stream comes in; `result()` turns them into a RequestResult."""

    def __init__(self, spec: RequestSpec, scheduled_s: float, t0: float):
        self.spec, self.scheduled_s, self.t0 = spec, scheduled_s, t0
        self.t_send = time.perf_counter()
        self.t_end: float | None = None
        self.token_times: list[float] = []
        self.pieces: list[str] = []
        self.status: int | None = None
        self.error: str | None = None
        self.detail: str | None = None
        self.usage: dict | None = None
        self.headers: httpx.Headers | None = None

    def fail(self, kind: str, detail: str | None = None) -> None:
        if self.error is None:  # the first cause wins
            self.error, self.detail = kind, detail

    def result(self) -> RequestResult:
        times, usage = self.token_times, self.usage or {}
        n_out = usage.get("completion_tokens", len(times)) if self.usage else len(times)
        details = usage.get("prompt_tokens_details") or {}
        ok = self.error is None
        return RequestResult(
            id=self.spec.id, session_id=self.spec.session_id, turn=self.spec.turn, status=self.status,
            error=self.error, error_detail=self.detail, scheduled_s=self.scheduled_s, start_s=self.t_send - self.t0,
            ttft_s=times[0] - self.t_send if times else None,
            itl_s=[b - a for a, b in zip(times, times[1:])],
            tpot_s=(times[-1] - times[0]) / (n_out - 1) if ok and len(times) > 1 and n_out > 1 else None,
            e2e_s=self.t_end - self.t_send if ok and self.t_end is not None else None,
            output_tokens=n_out, prompt_tokens=usage.get("prompt_tokens"), cached_tokens=details.get("cached_tokens"),
            request_id=self.headers.get("x-request-id") if self.headers else None,
            replica_id=self.headers.get("x-replica-id") if self.headers else None,
        )


async def _events(lines):
    """SSE: yields each event's data (its data lines joined), dispatched at the blank line."""
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # comments (":") and other fields (event/id/retry) carry nothing we measure
    if data:
        yield "\n".join(data)


def _content(chunk: dict) -> str:
    """The text a chunk adds (chat delta or completions text) over all choices."""
    out = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            out.append(text)
    return "".join(out)


class LoadClient:
    def __init__(self, cfg: ClientConfig):
        check_target(cfg.url, cfg.allow_remote)
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    async def discover_model(self, http: httpx.AsyncClient) -> str:
        resp = await http.get(f"{self.base}/v1/models", headers=self.headers)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.base}/v1/models lists no model; pass a model name")
        return data[0]["id"]

    def _body(self, spec: RequestSpec, model: str, answers: dict[str, str]) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        if spec.messages is not None:
            body["messages"] = [{"role": m.role, "content": answers.get(m.answer_of, m.content) if m.answer_of
                                 else m.content} for m in spec.messages]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = spec.prompt
            path = "/v1/completions"
        body.update(spec.extra_body)
        return f"{self.base}{path}", body

    async def _stream(self, http: httpx.AsyncClient, url: str, body: dict, m: _Measure) -> None:
        async with http.stream("POST", url, json=body, headers=self.headers) as resp:
            m.status, m.headers = resp.status_code, resp.headers
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                try:
                    detail = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    detail = raw[:500]
                m.fail(f"http_{resp.status_code}", detail)
                return
            done = False
            async for data in _events(resp.aiter_lines()):
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    m.fail("bad_event", data[:200])
                    continue
                if "error" in chunk:  # mid-stream failure reported in-band
                    err = chunk["error"]
                    m.fail("stream_error", err.get("message") if isinstance(err, dict) else str(err))
                    continue
                text = _content(chunk)
                if text:
                    m.token_times.append(now)
                    m.pieces.append(text)
                if chunk.get("usage"):
                    m.usage = chunk["usage"]
            m.t_end = time.perf_counter()
            if not done and self.cfg.require_done:
                m.fail("incomplete", "stream ended without [DONE]")

    async def _send(self, http, spec: RequestSpec, model: str, scheduled_s: float, t0: float,
                    answers: dict[str, str], results: list[RequestResult]) -> None:
        url, body = self._body(spec, model, answers)
        m = _Measure(spec, scheduled_s, t0)
        try:
            await asyncio.wait_for(self._stream(http, url, body, m), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            m.fail("timeout", f"no complete answer in {self.cfg.request_timeout_s} s")
        except asyncio.CancelledError:
            m.fail(DEADLINE, "cut off by the run deadline")
            results.append(m.result())
            raise
        except httpx.HTTPError as e:
            m.fail(type(e).__name__, str(e)[:500])
        if m.error is None:
            answers[spec.id] = "".join(m.pieces)
        results.append(m.result())

    async def run(self, workload: Workload, status: StatusSource | None = None) -> RunResult:
        specs = workload.requests[: self.cfg.max_requests]
        show = self.cfg.progress if self.cfg.progress is not None else (len(specs) >= 50 and sys.stderr.isatty())
        bar = tqdm(total=len(specs), unit="req", disable=not show, file=sys.stderr)
        try:
            return await self._run(workload, specs, bar, status)
        finally:
            bar.close()

    async def _run(self, workload: Workload, specs: list[RequestSpec], bar: tqdm, status: StatusSource | None):
        cfg = self.cfg
        present = {s.id for s in specs}
        arrival = workload.config.arrival
        closed = arrival.kind == "closed_loop"
        width = max(arrival.concurrency if closed else len(specs), 1) + 4
        timeout = httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s)
        limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
        results: list[RequestResult] = []
        answers: dict[str, str] = {}
        sampler = StatusSampler(status, cfg.status_interval_s, allow_remote=cfg.allow_remote) if status else None
        stop = asyncio.Event()
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat()

        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            model = cfg.model or await self.discover_model(http)
            t0 = time.perf_counter()
            sampling = asyncio.ensure_future(sampler.run(t0, stop)) if sampler else None
            finished: dict[str, asyncio.Event] = {s.id: asyncio.Event() for s in specs}

            async def one(spec: RequestSpec, scheduled_s: float) -> None:
                try:
                    await self._send(http, spec, model, scheduled_s, t0, answers, results)
                finally:
                    finished[spec.id].set()
                    bar.update(1)

            async def open_loop(spec: RequestSpec) -> None:
                ready = spec.arrival_s
                if spec.after in present:
                    await finished[spec.after].wait()
                    ready = max(ready, time.perf_counter() - t0 + spec.think_time_s)
                await asyncio.sleep(max(0.0, t0 + ready - time.perf_counter()))
                await one(spec, ready)

            async def closed_loop() -> None:
                # Ready queue: first turns in workload order; a later turn joins when its predecessor ends.
                queue: asyncio.Queue[RequestSpec | None] = asyncio.Queue()
                by_after = {s.after: s for s in specs if s.after in present}
                for s in specs:
                    if s.after not in present:
                        queue.put_nowait(s)
                left = [len(specs)]

                async def worker() -> None:
                    while (spec := await queue.get()) is not None:
                        if spec.think_time_s:
                            await asyncio.sleep(spec.think_time_s)
                        await one(spec, time.perf_counter() - t0)
                        if (nxt := by_after.get(spec.id)) is not None:
                            queue.put_nowait(nxt)
                        left[0] -= 1
                        if left[0] == 0:
                            for _ in range(arrival.concurrency):
                                queue.put_nowait(None)

                if specs:
                    await asyncio.gather(*(worker() for _ in range(arrival.concurrency)))

            main = closed_loop() if closed else asyncio.gather(*(open_loop(s) for s in specs))
            try:
                await asyncio.wait_for(main, cfg.deadline_s)
            except asyncio.TimeoutError:
                pass  # in-flight requests recorded themselves as cut off; unsent ones are simply not sent
            finally:
                duration = time.perf_counter() - t0
                stop.set()
                if sampling is not None:
                    await sampling
        results.sort(key=lambda r: r.start_s)
        return RunResult(
            started_at=started_at, url=self.base, model=model, workload=workload.config.model_dump(mode="json"),
            arrival_kind=arrival.kind, offered_load=arrival.offered_load, results=results,
            summary=summarize(results, duration, cfg.slo),
            timeseries=sampler.points if sampler else [], status_errors=sampler.errors if sampler else 0)


async def run_load(workload: Workload, cfg: ClientConfig, status: StatusSource | None = None) -> RunResult:
    return await LoadClient(cfg).run(workload, status)


def run_load_sync(workload: Workload, cfg: ClientConfig, status: StatusSource | None = None) -> RunResult:
    return asyncio.run(run_load(workload, cfg, status))
