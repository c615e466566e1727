"""Benchmark suite runner: an ordered list of named steps, each `fn(base_url, out_dir) -> dict`
(a JSON-able digest, optionally with a one-line "headline"; the step writes its full report into
out_dir). `run_suite` runs them one by one into out_dir/<step name>/ under a progress bar and writes
the index, suite.json and suite.md (headline, wall time and report of each step, the load average);
a step that raises is recorded and the suite goes on.

`default_steps` below measure a server that is already running (`--url`); the standard suite on
local clusters, whose steps start their own (`python -m load_tests suite` without --url,
`llm-cluster bench`), is load_tests.standard.

Adding a step: append `Step("name", fn)`. Steps that need a cluster of their own are built from a
`launch(policy)` context manager that starts the cluster and yields its base URL (the integration
layer supplies it):

    steps = default_steps(cfg) + [policy_comparison_step(launch, cfg), autoscaling_step(cfg, status="/status")]
    run_suite("http://127.0.0.1:8000", "reports/suite", steps)

`policy_comparison_step` runs the same multi-turn shared-prefix workload under each routing policy
and reports hit rate, TTFT and load balance by policy with the DESIGN targets (prefix against
pow2). `autoscaling_step` runs a ramp while sampling the status source (a path on the base URL,
a full URL or a callable) for the replicas-against-queue-depth plot.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field
from tqdm import tqdm

from load_tests.client import ClientConfig, RunResult, run_load_sync
from load_tests.report import write_comparison_report, write_run_report, write_sweep_report
from load_tests.sampler import StatusSource
from load_tests.workloads import (
    Arrival,
    LengthDist,
    RatePhase,
    ShareGPTConfig,
    burst_phases,
    generate,
    preset,
    ramp_phases,
)


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[str, Path], dict]


class SuiteConfig(BaseModel):
    requests: int = Field(64, ge=1)  # per run
    seed: int = 0
    concurrency: int = Field(8, ge=1)  # closed-loop runs
    sweep: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])  # concurrency levels of the sweep
    burst: list[RatePhase] = Field(default_factory=lambda: burst_phases(1.0, 8.0))
    ramp: list[RatePhase] = Field(default_factory=lambda: ramp_phases(0.5, 8.0))
    ignore_eos: bool = False
    # Lengths of the ShareGPT-shaped steps (single runs, bursts, ramps); None keeps the preset's.
    sharegpt_input: LengthDist | None = None
    sharegpt_output: LengthDist | None = None
    client: ClientConfig = Field(default_factory=lambda: ClientConfig(url="http://127.0.0.1"))  # url set per step

    def client_for(self, base_url: str) -> ClientConfig:
        return self.client.model_copy(update={"url": base_url})

    def workload(self, name: str, arrival: Arrival | None):
        wl = preset(name, requests=self.requests, seed=self.seed, arrival=arrival, ignore_eos=self.ignore_eos)
        if isinstance(wl, ShareGPTConfig):
            wl = wl.model_copy(update={k: v for k, v in (("input_tokens", self.sharegpt_input),
                                                         ("output_tokens", self.sharegpt_output)) if v is not None})
        return wl


def digest(run: RunResult, report_json: str | None = None) -> dict:
    s = run.summary
    return {"report": report_json, "sent": s.sent, "ok": s.ok, "errors": s.errors,
            "output_throughput": s.output_throughput, "request_throughput": s.request_throughput,
            "goodput": s.goodput, "ttft_p50_s": s.ttft_s.p50 if s.ttft_s else None,
            "tpot_p50_s": s.tpot_s.p50 if s.tpot_s else None, "cache_hit_rate": s.cache_hit_rate,
            "max_over_mean_load": s.max_over_mean_load}


def run_sweep(workload: str, loads: list[float], client: ClientConfig, *, requests: int, seed: int = 0,
              open_loop: bool = False, ignore_eos: bool = False) -> list[RunResult]:
    """The same workload at each load: concurrency levels (closed loop) or Poisson rates (open loop).
    Each point gets its own seed (seed + i): reusing prompts would hit the prefix cache filled by the
    previous point and flatter every point after the first."""
    runs = []
    for i, x in enumerate(loads):
        arrival = Arrival(kind="poisson", rate=x) if open_loop else Arrival(concurrency=int(x))
        wl = generate(preset(workload, requests=requests, seed=seed + i, arrival=arrival, ignore_eos=ignore_eos))
        runs.append(run_load_sync(wl, client.model_copy(update={"max_requests": requests})))
    return runs


def _single(cfg: SuiteConfig, workload: str, arrival: Arrival | None, title: str) -> Callable[[str, Path], dict]:
    def step(base_url: str, out: Path) -> dict:
        wl = generate(cfg.workload(workload, arrival))
        client = cfg.client_for(base_url).model_copy(update={"max_requests": cfg.requests})
        run = run_load_sync(wl, client)
        return digest(run, write_run_report(run, out, title=title).json_path)
    return step


def _phased(cfg: SuiteConfig, phases: list[RatePhase], status: StatusSource | None, title: str,
            replicas_key: str = "replicas", queue_key: str = "queue_depth") -> Callable[[str, Path], dict]:
    def step(base_url: str, out: Path) -> dict:
        wl = generate(cfg.workload("sharegpt", Arrival(kind="poisson", phases=phases)))
        source = base_url.rstrip("/") + status if isinstance(status, str) and status.startswith("/") else status
        run = run_load_sync(wl, cfg.client_for(base_url).model_copy(update={"max_requests": cfg.requests}), source)
        files = write_run_report(run, out, title=title, replicas_key=replicas_key, queue_key=queue_key)
        return {**digest(run, files.json_path), "status_samples": len(run.timeseries)}
    return step


def default_steps(cfg: SuiteConfig) -> list[Step]:
    """The steps that only need a running server at base_url."""
    def sweep(base_url: str, out: Path) -> dict:
        runs = run_sweep("sharegpt", cfg.sweep, cfg.client_for(base_url), requests=cfg.requests, seed=cfg.seed,
                         ignore_eos=cfg.ignore_eos)
        files = write_sweep_report(runs, out, title="sharegpt concurrency sweep")
        return {"report": files.json_path, "points": [{"concurrency": r.offered_load, **digest(r)}
                                                       for r in runs]}
    return [
        Step("sharegpt_sweep", sweep),
        Step("multiturn", _single(cfg, "multiturn", Arrival(concurrency=cfg.concurrency), "multi-turn shared prefix")),
        Step("long_context", _single(cfg, "long_context", Arrival(concurrency=cfg.concurrency), "long context")),
        Step("burst", _phased(cfg, cfg.burst, None, "bursts")),
    ]


def policy_comparison_step(launch: Callable[[str], AbstractContextManager[str]], cfg: SuiteConfig,
                           policies: tuple[str, ...] = ("round_robin", "pow2", "prefix")) -> Step:
    """Same multi-turn workload under each policy, each on a fresh cluster from launch(policy)."""
    def step(base_url: str, out: Path) -> dict:
        runs: dict[str, RunResult] = {}
        for policy in policies:
            with launch(policy) as url:
                wl = generate(preset("multiturn", requests=cfg.requests, seed=cfg.seed, ignore_eos=cfg.ignore_eos,
                                     arrival=Arrival(concurrency=cfg.concurrency)))
                runs[policy] = run_load_sync(wl, cfg.client_for(url).model_copy(update={"max_requests": cfg.requests}))
        files = write_comparison_report(runs, out, title="routing policies")
        result = {"report": files.json_path, "policies": {k: digest(r) for k, r in runs.items()}}
        if "prefix" in runs and "pow2" in runs:
            p, q = runs["prefix"].summary, runs["pow2"].summary
            result["prefix_vs_pow2"] = {
                "hit_rate_ratio": (p.cache_hit_rate / q.cache_hit_rate
                                   if p.cache_hit_rate and q.cache_hit_rate else None),
                "ttft_p50_speedup": q.ttft_s.p50 / p.ttft_s.p50 if p.ttft_s and q.ttft_s else None,
                "prefix_max_over_mean_load": p.max_over_mean_load,
                "targets": {"hit_rate_ratio": ">= 3", "ttft_p50_speedup": ">= 2",
                            "prefix_max_over_mean_load": "<= 1.5"},
            }
        return result
    return Step("policy_comparison", step)


def autoscaling_step(cfg: SuiteConfig, status: StatusSource, *, replicas_key: str = "replicas",
                     queue_key: str = "queue_depth") -> Step:
    """A ramp (cfg.ramp) while sampling `status`: "/path" on the base URL, a full URL, or a callable."""
    return Step("autoscaling", _phased(cfg, cfg.ramp, status, "autoscaling ramp", replicas_key, queue_key))


def run_suite(base_url: str | None, out_dir: str | Path, steps: list[Step], only: list[str] | None = None, *,
              meta: dict | None = None, progress: bool = True) -> dict:
    """Run the steps (or those named in `only`) in order into out_dir/<step>/, with a progress bar over
    steps, and write the index: suite.json (every digest, each step's wall time, `meta`) and suite.md.
    base_url None: the steps start their own servers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(only or []) - {s.name for s in steps}
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; have {[s.name for s in steps]}")
    chosen = [s for s in steps if not only or s.name in only]
    # On a shared box the load average belongs beside the numbers.
    meta = {**(meta or {}), "load_average_start": _loadavg()}
    results: dict[str, dict] = {}
    durations: dict[str, float] = {}
    loads: dict[str, str] = {}  # 1-minute load average at the step's start -> end
    bar = tqdm(chosen, desc="suite", unit="step", disable=not progress, file=sys.stderr)
    for s in bar:
        bar.set_postfix_str(s.name)
        t0, load0 = time.monotonic(), os.getloadavg()[0]
        try:
            results[s.name] = {"ok": True, **s.fn(base_url, out / s.name)}
        except Exception as e:  # noqa: BLE001 - one broken step must not lose the others' results
            results[s.name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        durations[s.name] = round(time.monotonic() - t0, 1)
        loads[s.name] = f"{load0:.1f} → {os.getloadavg()[0]:.1f}"
    bar.close()
    meta["load_average_end"] = _loadavg()
    (out / "suite.json").write_text(json.dumps({"url": base_url, "meta": meta, "durations_s": durations,
                                                "load_average_1min": loads, "steps": results}, indent=1, default=str))
    (out / "suite.md").write_text(_index_markdown(base_url, out, results, durations, loads, meta))
    return results


def _loadavg() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def _index_markdown(base_url: str | None, out: Path, results: dict[str, dict], durations: dict[str, float],
                    loads: dict[str, str], meta: dict) -> str:
    lines = ["# benchmark suite", "", f"target {base_url or 'local clusters started by each step'}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + ([""] if meta else [])
    lines += ["| step | result | time | load avg (1 min) | report |", "|---|---|---|---|---|"]
    for name, r in results.items():
        result = ("ok" + (f": {r['headline']}" if r.get("headline") else "")) if r["ok"] else r["error"]
        report = ""
        if r.get("report"):
            rel = Path(r["report"]).relative_to(out)
            report = f"[{rel.with_suffix('.md')}]({rel.with_suffix('.md')}) · {rel}"
        lines.append(f"| {name} | {result} | {durations[name]:.0f} s | {loads[name]} | {report} |")
    return "\n".join(lines) + "\n"
