"""Reports (JSON, PNG plots, markdown) from runs against the fake server; the suite and the CLI."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from load_tests.__main__ import main
from load_tests.client import ClientConfig, run_load
from load_tests.metrics import SLO
from load_tests.report import write_comparison_report, write_run_report, write_sweep_report
from load_tests.suite import (
    Step,
    SuiteConfig,
    autoscaling_step,
    default_steps,
    policy_comparison_step,
    run_suite,
    run_sweep,
)
from load_tests.workloads import Arrival, LengthDist, MultiTurnConfig, RatePhase, generate


def _png_ok(path: str | Path) -> None:
    img = imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 400
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def _small_multiturn(**kw):
    return generate(MultiTurnConfig(conversations=4, turns=3, system_prompt_tokens=32, max_tokens=6,
                                    user_tokens=LengthDist(median=8), **kw))


async def test_run_report_files_and_numbers(fake_openai, tmp_path):
    srv = fake_openai(ttft_s=0.03, itl_s=0.005)
    n = iter(range(1000))

    def status():
        i = next(n)
        return {"replicas": 1 + i // 3, "queue_depth": max(0, 6 - i)}

    cfg = ClientConfig(url=srv.url, status_interval_s=0.05, slo=SLO(ttft_s=1.0, tpot_s=0.1))
    run = await run_load(_small_multiturn(arrival=Arrival(concurrency=2)), cfg, status)
    files = write_run_report(run, tmp_path / "rep", title="multiturn test")
    assert set(files.plots) == {"latency_cdf", "replica_load", "replicas_vs_queue"} and files.skipped == {}
    for png in files.plots.values():
        _png_ok(png)
    data = json.loads(Path(files.json_path).read_text())
    s = data["run"]["summary"]
    assert data["kind"] == "run" and data["plots"]["latency_cdf"] == "latency_cdf.png"
    assert s["sent"] == s["ok"] == 12 and len(data["run"]["results"]) == 12
    assert 0.03 <= s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] < 1.0
    assert 0.004 <= s["tpot_s"]["p50"] < 0.05
    assert s["output_throughput"] == pytest.approx(12 * 6 / s["duration_s"])
    assert s["goodput"] == pytest.approx(s["request_throughput"])  # every request meets the loose SLO
    assert 0 < s["cache_hit_rate"] < 1 and s["max_over_mean_load"] == pytest.approx(1.0)
    assert data["run"]["timeseries"][0]["values"] == {"replicas": 1.0, "queue_depth": 6.0}
    md = Path(files.markdown_path).read_text()
    assert "| multiturn test | 12/12 | 0 |" in md and "![latency_cdf](latency_cdf.png)" in md


async def test_plots_without_data_are_skipped_with_a_reason(fake_openai, tmp_path):
    srv = fake_openai(replicas=())
    run = await run_load(_small_multiturn(), ClientConfig(url=srv.url))
    files = write_run_report(run, tmp_path)
    assert set(files.plots) == {"latency_cdf"}
    data = json.loads(Path(files.json_path).read_text())
    assert set(data["skipped"]) == {"replica_load", "replicas_vs_queue"}
    assert "x-replica-id" in data["skipped"]["replica_load"]
    assert "not drawn" in Path(files.markdown_path).read_text()


def _most_in_flight(run) -> int:
    events = sorted([(r.start_s, 1) for r in run.results] + [(r.start_s + r.e2e_s, -1) for r in run.results])
    most = now = 0
    for _, step in events:  # at equal times an end comes before a start
        now += step
        most = max(most, now)
    return most


def test_sweep_report(fake_openai, tmp_path):
    srv = fake_openai(ttft_s=0.05, itl_s=0.01)
    runs = run_sweep("multiturn", [2, 1], ClientConfig(url=srv.url), requests=8)
    files = write_sweep_report(runs, tmp_path, title="mt sweep")
    _png_ok(files.plots["sweep_throughput"])
    data = json.loads(Path(files.json_path).read_text())
    assert [p["offered_load"] for p in data["points"]] == [1.0, 2.0]
    # each point ran at its own concurrency (counted from the requests' intervals, not from throughput,
    # which a stalled box can flatten)
    assert {run.offered_load: _most_in_flight(run) for run in runs} == {1.0: 1, 2.0: 2}
    for p in data["points"]:
        assert (tmp_path / p["report"]).exists()
    # each point has its own prompts: the second point must not ride on the first one's cache
    assert runs[0].results[0].cached_tokens == 0 and runs[1].results[0].cached_tokens == 0


def _fake_launcher(fake_openai):
    started = []

    @contextlib.contextmanager
    def launch(policy: str):
        # "prefix" is faster and caches; the others never hit (a new server per policy, like a fresh cluster)
        srv = fake_openai(ttft_s=0.01 if policy == "prefix" else 0.1, itl_s=0.002, cache=policy == "prefix")
        started.append(policy)
        yield srv.url
    return launch, started


def test_policy_comparison_step_and_report(fake_openai, tmp_path):
    launch, started = _fake_launcher(fake_openai)
    cfg = SuiteConfig(requests=8, concurrency=2)
    step = policy_comparison_step(launch, cfg, policies=("pow2", "prefix"))
    digest = step.fn("http://127.0.0.1:1", tmp_path)
    assert started == ["pow2", "prefix"]
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["runs"]["pow2"]["summary"]["cache_hit_rate"] == 0.0
    assert data["runs"]["prefix"]["summary"]["cache_hit_rate"] > 0.3
    assert digest["prefix_vs_pow2"]["ttft_p50_speedup"] > 2.0
    assert digest["prefix_vs_pow2"]["hit_rate_ratio"] is None  # pow2 had no hits: no finite ratio
    _png_ok(tmp_path / "policy_hit_rate.png")
    assert (tmp_path / "prefix" / "run.json").exists() and (tmp_path / "pow2" / "latency_cdf.png").exists()
    direct = write_comparison_report({}, tmp_path / "empty")
    assert direct.skipped == {"policy_hit_rate": "no runs"}


def test_suite_runs_every_step_and_survives_a_broken_one(fake_openai, tmp_path):
    srv = fake_openai(ttft_s=0.005, itl_s=0.0005)
    srv.status = {"replicas": 2, "queue_depth": 3}
    cfg = SuiteConfig(requests=4, concurrency=2, sweep=[1, 2], burst=[RatePhase(duration_s=0.5, start_rate=8.0)],
                      ramp=[RatePhase(duration_s=0.6, start_rate=2.0, end_rate=10.0)],
                      client=ClientConfig(url="http://127.0.0.1", status_interval_s=0.1))

    def broken(base_url: str, out: Path) -> dict:
        raise RuntimeError("cluster did not come up")

    steps = default_steps(cfg) + [autoscaling_step(cfg, "/status"), Step("broken", broken)]
    results = run_suite(srv.url, tmp_path, steps)
    assert list(results) == ["sharegpt_sweep", "multiturn", "long_context", "burst", "autoscaling", "broken"]
    assert all(results[k]["ok"] for k in list(results)[:-1])
    assert results["broken"] == {"ok": False, "error": "RuntimeError: cluster did not come up",
                                 "traceback": results["broken"]["traceback"]}
    assert results["multiturn"]["ok"] and results["multiturn"]["errors"] == {}
    assert results["autoscaling"]["status_samples"] >= 2
    _png_ok(tmp_path / "autoscaling" / "replicas_vs_queue.png")
    assert (tmp_path / "sharegpt_sweep" / "sweep_throughput.png").exists()
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["steps"]["long_context"]["sent"] == 4
    md = (tmp_path / "suite.md").read_text()
    assert "| broken | RuntimeError: cluster did not come up |" in md and "multiturn/run.json" in md
    with pytest.raises(ValueError):
        run_suite(srv.url, tmp_path, steps, only=["nope"])
    only = run_suite(srv.url, tmp_path / "only", steps, only=["multiturn"])
    assert list(only) == ["multiturn"]


def test_cli_run_and_suite(fake_openai, tmp_path, capsys):
    srv = fake_openai(ttft_s=0.005, itl_s=0.0005)
    rc = main(["run", "--url", srv.url, "--workload", "multiturn", "--requests", "8", "--concurrency", "2",
               "--out", str(tmp_path / "x"), "--slo-ttft-ms", "500", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| multiturn | 8/8 | 0 |" in out
    data = json.loads((tmp_path / "x" / "run.json").read_text())
    assert data["run"]["arrival_kind"] == "closed_loop" and data["run"]["offered_load"] == 2
    assert data["run"]["summary"]["slo"]["ttft_s"] == 0.5
    assert (tmp_path / "x" / "latency_cdf.png").exists()
    rc = main(["run", "--url", srv.url, "--workload", "sharegpt", "--requests", "3", "--rate", "20", "--fixed-rate",
               "--out", str(tmp_path / "y")])
    assert rc == 0
    assert json.loads((tmp_path / "y" / "run.json").read_text())["run"]["arrival_kind"] == "fixed_rate"
    assert main(["suite", "--url", srv.url, "--out", str(tmp_path / "s"), "--requests", "4",
                 "--steps", "multiturn,long_context"]) == 0
    assert json.loads((tmp_path / "s" / "suite.json").read_text())["steps"].keys() == {"multiturn", "long_context"}
    assert main(["run", "--url", "http://192.0.2.1:8000", "--out", str(tmp_path / "z")]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
