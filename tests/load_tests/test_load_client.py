"""The load client against a fake streaming server with known delays: measurements, errors,
bounds (deadline, timeout, max requests), loopback-only targets, multi-turn answer feeding."""
from __future__ import annotations

import time

import pytest

from load_tests.client import ClientConfig, LoadClient, run_load
from load_tests.metrics import SLO, RequestResult, summarize
from load_tests.sampler import StatusSampler
from load_tests.target import RemoteTargetRefused, check_target, is_loopback_url
from load_tests.workloads import (
    Arrival,
    LengthDist,
    Message,
    MultiTurnConfig,
    RequestSpec,
    ShareGPTConfig,
    Workload,
    generate,
)


def _chat(n: int, text: str = "hello there", max_tokens: int = 8, arrival: Arrival | None = None, **kw) -> Workload:
    specs = [RequestSpec(id=f"r{i}", session_id=f"r{i}", messages=[Message(role="user", content=f"{text} {i}")],
                         max_tokens=max_tokens, **kw) for i in range(n)]
    cfg = ShareGPTConfig(requests=n, arrival=arrival or Arrival(concurrency=n))
    return Workload(config=cfg, requests=specs)


async def test_ttft_itl_tpot_and_tokens_match_the_server_delays(fake_openai):
    srv = fake_openai(ttft_s=0.2, itl_s=0.05)
    run = await run_load(_chat(4, max_tokens=8), ClientConfig(url=srv.url))
    s = run.summary
    assert s.sent == s.ok == 4 and s.errors == {}
    # The server never sends early, so the lower bounds are exact; the upper ones leave room for a box
    # that stalls for a moment (the test asserts definitions, not speed).
    for r in run.results:
        # the role-only chunk comes at once: it must not count as the first token
        assert 0.19 <= r.ttft_s <= 2.0
        assert len(r.itl_s) == 7 and r.output_tokens == 8
        assert sorted(r.itl_s)[3] >= 0.045  # gaps between content tokens only (not role, finish or usage chunks)
        assert r.tpot_s == pytest.approx(sum(r.itl_s) / 7)  # first to last token over 7 gaps: TTFT not in it
        assert r.e2e_s >= r.ttft_s + sum(r.itl_s)
        assert r.prompt_tokens == 3 and r.status == 200
        assert r.request_id.startswith("req-") and r.replica_id in ("replica-a", "replica-b")
    assert 0.045 <= s.itl_s.p50 <= 0.15 and s.itl_s.count == 28
    assert s.output_tokens == 32
    assert run.model == "fake-model"  # discovered from /v1/models
    assert set(s.replicas) == {"replica-a", "replica-b"} and s.max_over_mean_load == pytest.approx(1.0)


async def test_completions_api_and_cached_tokens(fake_openai):
    srv = fake_openai(ttft_s=0.01, itl_s=0.001)
    prefix = " ".join(["shared"] * 32)
    specs = [RequestSpec(id=f"p{i}", session_id=f"p{i}", prompt=f"{prefix} tail {i}", max_tokens=3,
                         extra_body={"ignore_eos": True}) for i in range(3)]
    wl = Workload(config=ShareGPTConfig(requests=3, api="completions", arrival=Arrival(concurrency=1)), requests=specs)
    run = await run_load(wl, ClientConfig(url=srv.url + "/v1", model="m", temperature=0.0, api_key="sk-test"))
    assert [b["prompt"] for b in srv.bodies] == [s.prompt for s in specs]
    assert srv.authorization == ["Bearer sk-test"] * 3
    assert all(b["model"] == "m" and b["temperature"] == 0.0 and b["stream"] and b["ignore_eos"] for b in srv.bodies)
    assert [r.cached_tokens for r in run.results] == [0, 32, 32]
    assert run.summary.cache_hit_rate == pytest.approx(64 / (3 * 34))
    assert all(r.output_tokens == 3 for r in run.results)


async def test_http_and_stream_errors_are_counted(fake_openai):
    srv = fake_openai()
    specs = _chat(2).requests + [
        RequestSpec(id="e500", session_id="e500", messages=[Message(role="user", content="x [[status=500]]")],
                    max_tokens=4),
        RequestSpec(id="e429a", session_id="e429a", prompt="x [[status=429]]", max_tokens=4),
        RequestSpec(id="e429b", session_id="e429b", prompt="y [[status=429]]", max_tokens=4),
        RequestSpec(id="mid", session_id="mid", prompt="z [[error_after=3]]", max_tokens=8),
        RequestSpec(id="cut", session_id="cut", prompt="z [[truncate=2]]", max_tokens=8),
        RequestSpec(id="junk", session_id="junk", prompt="z [[garbage=1]]", max_tokens=8),
    ]
    run = await run_load(Workload(config=ShareGPTConfig(requests=8), requests=specs), ClientConfig(url=srv.url))
    s = run.summary
    assert s.errors == {"http_500": 1, "http_429": 2, "stream_error": 1, "incomplete": 1, "bad_event": 1}
    assert s.sent == 8 and s.ok == 2 and s.failed == 6 and s.cancelled == 0
    by_id = {r.id: r for r in run.results}
    assert by_id["e500"].status == 500 and by_id["e500"].error_detail == "fake 500"
    assert by_id["mid"].status == 200 and by_id["mid"].error_detail == "replica died"
    assert by_id["mid"].output_tokens == 3 and by_id["mid"].e2e_s is None
    assert s.output_tokens == 16  # only successful requests count toward throughput
    assert s.slo_attainment == pytest.approx(2 / 8)


async def test_connection_refused_is_an_error_not_a_crash(fake_openai):
    srv = fake_openai()
    srv.stop()
    run = await run_load(_chat(2), ClientConfig(url=srv.url, model="m", connect_timeout_s=2))
    assert run.summary.ok == 0 and run.summary.errors == {"ConnectError": 2}


def test_non_loopback_targets_are_refused():
    for url in ("http://127.0.0.1:8000", "http://127.9.8.7", "http://localhost:1/v1", "http://[::1]:8000"):
        assert is_loopback_url(url), url
        check_target(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://[2001:db8::1]:80", "http://0.0.0.0:80",
                "http://localhost.evil.com"):
        assert not is_loopback_url(url), url
        with pytest.raises(RemoteTargetRefused):
            LoadClient(ClientConfig(url=url))
    with pytest.raises(RemoteTargetRefused):
        StatusSampler("http://192.168.1.1/status")
    with pytest.raises(ValueError):
        check_target("ftp://127.0.0.1/")
    LoadClient(ClientConfig(url="http://10.0.0.1:8000", allow_remote=True))  # opted in: accepted


async def test_deadline_cuts_off_in_flight_requests_and_stops_the_run(fake_openai):
    srv = fake_openai(ttft_s=0.05, itl_s=0.2)
    wl = _chat(20, max_tokens=100, arrival=Arrival(concurrency=3))  # each would take 20 s
    t = time.perf_counter()
    run = await run_load(wl, ClientConfig(url=srv.url, deadline_s=1.0))
    assert time.perf_counter() - t < 5.0
    s = run.summary
    assert s.sent == 3 and s.cancelled == 3 and s.errors == {"deadline": 3} and s.failed == 0
    assert all(r.ttft_s is not None and r.output_tokens >= 3 for r in run.results)  # partial streams kept
    assert 1.0 <= s.duration_s < 2.5


async def test_deadline_stops_an_open_loop_run(fake_openai):
    srv = fake_openai(ttft_s=0.01, itl_s=0.001)
    wl = _chat(50, max_tokens=2, arrival=Arrival(kind="fixed_rate", rate=5.0))  # would take 10 s
    for i, spec in enumerate(wl.requests):
        spec.arrival_s = 0.1 + i / 5.0  # 0.1, 0.3, ... 0.9 fit before the deadline; 1.1 ... do not
    t = time.perf_counter()
    run = await run_load(wl, ClientConfig(url=srv.url, deadline_s=1.0))
    assert time.perf_counter() - t < 5.0
    assert run.summary.sent == run.summary.ok == 5


async def test_request_timeout(fake_openai):
    srv = fake_openai()
    wl = _chat(1, text="[[ttft=3]]")
    t = time.perf_counter()
    run = await run_load(wl, ClientConfig(url=srv.url, request_timeout_s=0.3))
    assert time.perf_counter() - t < 2.5  # the server would answer only after 3 s
    assert run.summary.errors == {"timeout": 1}


async def test_open_loop_sends_on_schedule_and_caps_max_requests(fake_openai):
    srv = fake_openai(ttft_s=0.01, itl_s=0.001)
    wl = _chat(10, max_tokens=2, arrival=Arrival(kind="fixed_rate", rate=10.0))
    for i, spec in enumerate(wl.requests):
        spec.arrival_s = i * 0.1
    run = await run_load(wl, ClientConfig(url=srv.url, max_requests=6))
    assert [r.id for r in run.results] == [f"r{i}" for i in range(6)]
    for r in run.results:
        assert r.scheduled_s == pytest.approx(int(r.id[1:]) * 0.1)
        assert 0 <= r.start_s - r.scheduled_s < 1.0  # never early; late only by event-loop lag (a stalled box)
    assert len(srv.bodies) == 6


async def test_closed_loop_keeps_concurrency_in_flight(fake_openai):
    srv = fake_openai(ttft_s=0.05, itl_s=0.01)
    run = await run_load(_chat(12, max_tokens=4, arrival=Arrival(concurrency=3)), ClientConfig(url=srv.url))
    assert run.summary.ok == 12
    assert srv.max_active == 3
    assert run.offered_load == 3 and run.arrival_kind == "closed_loop"


@pytest.mark.parametrize("arrival", [Arrival(concurrency=4), Arrival(kind="poisson", rate=50.0)],
                         ids=["closed", "open"])
async def test_multiturn_feeds_the_real_previous_answer(fake_openai, arrival):
    srv = fake_openai(ttft_s=0.01, itl_s=0.002)
    wl = generate(MultiTurnConfig(conversations=3, turns=3, system_prompt_tokens=20, max_tokens=5,
                                  user_tokens=LengthDist(median=6), arrival=arrival, think_time_s=0.05))
    run = await run_load(wl, ClientConfig(url=srv.url))
    assert run.summary.ok == 9
    by_id = {r.id: r for r in run.results}
    answer = {r.id: srv.answers[r.request_id] for r in run.results}
    sent = {r.id: srv.bodies[int(r.request_id.split("-")[1])]["messages"] for r in run.results}
    for spec in wl.requests:
        msgs = sent[spec.id]
        assistant = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert assistant == [answer[f"{spec.session_id}-t{t}"] for t in range(spec.turn)]
        if spec.after:
            # sent only after the previous turn ended, plus think time
            prev = by_id[spec.after]
            assert by_id[spec.id].start_s >= prev.start_s + prev.e2e_s + 0.05 - 0.005
            assert by_id[spec.id].cached_tokens > 0  # the grown prefix was seen before
    assert "(previous answer)" not in str(sent)


async def test_progress_bar_is_shown_when_asked(fake_openai, capsys):
    srv = fake_openai(ttft_s=0.001, itl_s=0.001)
    await run_load(_chat(3, max_tokens=2), ClientConfig(url=srv.url, progress=True))
    assert "3/3" in capsys.readouterr().err
    await run_load(_chat(3, max_tokens=2), ClientConfig(url=srv.url, progress=False))
    assert "3/3" not in capsys.readouterr().err


async def test_status_time_series_from_callable_and_url(fake_openai):
    srv = fake_openai(ttft_s=0.01, itl_s=0.05)
    srv.status = {"replicas": 2, "queue_depth": 5, "per_replica": [{"waiting": 1}], "name": "x"}
    calls = []

    async def status():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("status endpoint hiccup")
        return {"replicas": len(calls), "queue_depth": 10 - len(calls)}

    cfg = ClientConfig(url=srv.url, status_interval_s=0.1)
    run = await run_load(_chat(2, max_tokens=10), cfg, status)
    assert run.status_errors == 1 and len(run.timeseries) >= 3
    assert run.timeseries[0].values == {"replicas": 1.0, "queue_depth": 9.0}
    assert all(b.t_s > a.t_s for a, b in zip(run.timeseries, run.timeseries[1:]))
    run = await run_load(_chat(2, max_tokens=10), cfg, srv.url + "/status")
    assert run.status_errors == 0 and len(run.timeseries) >= 3
    assert run.timeseries[0].values == {"replicas": 2.0, "queue_depth": 5.0, "per_replica.0.waiting": 1.0}


def _result(i: int, ttft: float, tpot: float | None, error: str | None = None, **kw) -> RequestResult:
    return RequestResult(id=str(i), session_id=str(i), scheduled_s=0, start_s=0, ttft_s=ttft, tpot_s=tpot,
                         error=error, e2e_s=None if error else 1.0, output_tokens=10, **kw)


def test_summary_goodput_percentiles_and_load_balance():
    results = [_result(0, 0.1, 0.01, replica_id="a", prompt_tokens=100, cached_tokens=50),
               _result(1, 0.3, 0.01, replica_id="a", prompt_tokens=100, cached_tokens=0),
               _result(2, 0.1, 0.05, replica_id="b"),
               _result(3, 0.1, None, replica_id="a"),  # one token: no TPOT, meets the TPOT bound
               _result(4, 0.1, 0.01, error="http_503"),
               _result(5, 0.1, 0.01, error="deadline")]
    s = summarize(results, duration_s=2.0, slo=SLO(ttft_s=0.2, tpot_s=0.02))
    assert (s.sent, s.ok, s.failed, s.cancelled) == (6, 4, 1, 1)
    assert s.goodput == pytest.approx(2 / 2.0) and s.slo_attainment == pytest.approx(2 / 6)
    assert s.request_throughput == pytest.approx(2.0) and s.output_throughput == pytest.approx(20.0)
    assert s.ttft_s.p50 == pytest.approx(0.1) and s.ttft_s.max == pytest.approx(0.3) and s.ttft_s.count == 4
    assert s.cache_hit_rate == pytest.approx(0.25)
    assert {k: v.requests for k, v in s.replicas.items()} == {"a": 3, "b": 1}
    assert s.max_over_mean_load == pytest.approx(1.5)
    empty = summarize([], 1.0)
    assert empty.ttft_s is None and empty.slo_attainment is None and empty.max_over_mean_load is None
