"""Command line: `python -m load_tests run|sweep|suite|soak ...` (see --help of each).

    python -m load_tests run --url http://127.0.0.1:8000 --workload multiturn --requests 100 --concurrency 8 \
        --out reports/x
    python -m load_tests sweep --url http://127.0.0.1:8000 --workload sharegpt --concurrency 1,2,4,8 --out reports/sweep
    python -m load_tests suite --url http://127.0.0.1:8000 --out reports/suite [--steps multiturn,long_context]
    python -m load_tests suite [--out reports/<date>] [--quick] [--steps routing_policies,autoscaling]
    python -m load_tests soak --minutes 20 --out reports/soak [--model embedded|tiny] (load_tests/soak.py)

`suite` without --url is the standard suite on local clusters (load_tests.standard: each step starts
what it needs on 127.0.0.1); `llm-cluster bench` runs the same.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from load_tests.client import ClientConfig, run_load_sync
from load_tests.metrics import SLO
from load_tests.report import summary_table, write_run_report, write_sweep_report
from load_tests.suite import SuiteConfig, default_steps, run_suite, run_sweep
from load_tests.target import check_target
from load_tests.workloads import PRESETS, Arrival, generate, preset


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _common(p: argparse.ArgumentParser, local_suite: bool = False) -> None:
    p.add_argument("--url", required=not local_suite, help="base URL of the OpenAI-compatible server" + (
        "; without it, the standard suite on local clusters" if local_suite else ""))
    p.add_argument("--out", required=not local_suite, type=Path, help="report directory" + (
        " (default reports/<date>)" if local_suite else ""))
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--requests", type=int, default=100, help="requests per run (workload size and cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds; a run stops by itself after this")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--api-key")
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT bound")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT bound")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate max_tokens every time")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")
    p.add_argument("--no-progress", action="store_true")


def _client(a: argparse.Namespace) -> ClientConfig:
    slo = SLO(ttft_s=a.slo_ttft_ms / 1000 if a.slo_ttft_ms else None,
              tpot_s=a.slo_tpot_ms / 1000 if a.slo_tpot_ms else None)
    return ClientConfig(url=a.url, model=a.model, max_requests=a.requests, deadline_s=a.deadline,
                        request_timeout_s=a.request_timeout, temperature=a.temperature, api_key=a.api_key,
                        allow_remote=a.allow_remote, slo=slo, progress=False if a.no_progress else None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="one workload, one report")
    _common(run)
    run.add_argument("--workload", choices=PRESETS, default="multiturn")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop with this many requests in flight")
    load.add_argument("--rate", type=float, help="open loop at this many req/s")
    run.add_argument("--fixed-rate", action="store_true", help="evenly spaced arrivals instead of Poisson")
    run.add_argument("--status-url", help="JSON URL sampled during the run (replicas, queue_depth)")
    run.add_argument("--status-interval", type=float, default=1.0)

    sweep = sub.add_parser("sweep", help="one workload at several loads")
    _common(sweep)
    sweep.add_argument("--workload", choices=[p for p in PRESETS if p not in ("burst", "ramp")], default="sharegpt")
    levels = sweep.add_mutually_exclusive_group(required=True)
    levels.add_argument("--concurrency", type=_floats, help="comma-separated concurrency levels")
    levels.add_argument("--rate", type=_floats, help="comma-separated Poisson rates (req/s)")

    suite = sub.add_parser("suite", help="the standard suite (suite.py lists the steps)")
    _common(suite, local_suite=True)
    suite.add_argument("--steps", help="comma-separated subset of the steps")
    suite.add_argument("--quick", action="store_true", help="local suite: every step shrunk (a few minutes)")
    suite.add_argument("--concurrency", type=int, default=8)
    suite.add_argument("--sweep", type=_floats, default=[1, 2, 4, 8], help="concurrency levels of the sweep step")

    from load_tests.soak import add_arguments as soak_arguments
    soak_arguments(sub.add_parser("soak", help="a local cluster under mixed load while replicas and Redis are "
                                  "killed: client errors, RSS over time, KV at the end"))
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "soak":
        from load_tests.soak import main_soak
        return main_soak(a, argv)
    if a.cmd == "suite" and a.url is None:
        return _local_suite(a)
    try:
        check_target(a.url, a.allow_remote)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = _client(a)
    if a.cmd == "run":
        arrival = None
        if a.rate is not None:
            arrival = Arrival(kind="fixed_rate" if a.fixed_rate else "poisson", rate=a.rate)
        elif a.concurrency is not None:
            arrival = Arrival(concurrency=a.concurrency)
        wl = generate(preset(a.workload, requests=a.requests, seed=a.seed, arrival=arrival, ignore_eos=a.ignore_eos))
        client = client.model_copy(update={"status_interval_s": a.status_interval})
        run = run_load_sync(wl, client, a.status_url)
        files = write_run_report(run, a.out, title=a.workload)
        print(summary_table({a.workload: run.summary}), end="")
        print(f"report: {files.markdown_path}")
        return 0 if run.summary.ok else 1
    if a.cmd == "sweep":
        loads = a.rate if a.rate is not None else a.concurrency
        runs = run_sweep(a.workload, loads, client, requests=a.requests, seed=a.seed, open_loop=a.rate is not None,
                         ignore_eos=a.ignore_eos)
        files = write_sweep_report(runs, a.out, title=f"{a.workload} sweep")
        print(Path(files.markdown_path).read_text(), end="")
        return 0 if all(r.summary.ok for r in runs) else 1
    cfg = SuiteConfig(requests=a.requests, seed=a.seed, concurrency=a.concurrency, sweep=[int(x) for x in a.sweep],
                      ignore_eos=a.ignore_eos, client=client)
    results = run_suite(a.url, a.out, default_steps(cfg), only=a.steps.split(",") if a.steps else None)
    print((Path(a.out) / "suite.md").read_text(), end="")
    return 0 if all(r["ok"] for r in results.values()) else 1


def _local_suite(a: argparse.Namespace) -> int:
    from load_tests.standard import run_standard_suite
    out = a.out or Path("reports") / datetime.date.today().isoformat()
    try:
        results = run_standard_suite(out, quick=a.quick, only=a.steps.split(",") if a.steps else None,
                                     progress=not a.no_progress)
    except ValueError as e:  # unknown step names
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(out) / "suite.md").read_text(), end="")
    return 0 if all(r["ok"] for r in results.values()) else 1


def bench(suite_args: list[str]) -> int:
    """`llm-cluster bench ...`: the standard suite on local clusters (the `llm_cluster.commands` entry point)."""
    return main(["suite", *suite_args])


if __name__ == "__main__":
    sys.exit(main())
