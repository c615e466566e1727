"""The standard benchmark suite on local clusters: `python -m load_tests suite --out DIR [--quick]` (no
--url) and `llm-cluster bench`. Each step starts what it needs on 127.0.0.1, measures, writes its report
(JSON, PNGs, markdown) under DIR/<step>/ and stops what it started; suite.py's runner writes the index.

Steps, in this order:
- serving_vs_transformers: `transformers serve` (plain, then with continuous batching), then our cluster
  with the embedded SmolLM2 on CPU, on the same chat streams (32 concurrent, 16 tokens each, greedy):
  output tok/s of each and ours over the best of theirs (DESIGN: >= 3x). Nothing of ours runs while
  transformers serve is measured.
- latency_throughput: the same SmolLM2 cluster (kept up from the step before), ShareGPT-shaped
  streaming chat at a fixed concurrency: TTFT / ITL / E2E and tok/s.
- routing_policies: load_tests.bench_routing as it is (round_robin / pow2 / prefix / Ray's
  PrefixCacheAffinityRouter, replicas of bench_routing's random-weight benchmark model, multi-turn
  shared-prefix workload), its runs turned into the comparison report, with the DESIGN targets of prefix
  against pow2.
- autoscaling: tiny-model replicas under bench_autoscaling's queue-depth policy config, a Poisson burst
  (quiet, burst, quiet) while replicas and queue depth are sampled every second.

Optional step, run only when named (`--steps soak`): soak (load_tests.soak: a local cluster under mixed
load for soak_minutes while replicas and Redis are killed; client errors, RSS over time, KV at the end).

StandardConfig.quick() shrinks every step (a few minutes in all) for the end-to-end test.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import multiprocessing
import os
import platform
import subprocess
import tempfile
import traceback
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster.ports import free_port
from load_tests.client import ClientConfig, RunResult, run_load_sync
from load_tests.report import plot_servers, write_comparison_report, write_run_report
from load_tests.sampler import TimePoint
from load_tests.suite import Step, SuiteConfig, autoscaling_step, digest, run_suite
from load_tests.workloads import Arrival, LengthDist, RatePhase, ShareGPTConfig, generate

TRANSFORMERS = "transformers serve"
TRANSFORMERS_CB = "transformers serve (CB)"
OURS = "llm-cluster"


def _burst(quiet_rate: float, peak_rate: float, before_s: float, burst_s: float, after_s: float) -> list[RatePhase]:
    return [RatePhase(duration_s=before_s, start_rate=quiet_rate), RatePhase(duration_s=burst_s, start_rate=peak_rate),
            RatePhase(duration_s=after_s, start_rate=quiet_rate)]


class StandardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    # serving_vs_transformers: the DESIGN workload (32 concurrent chat streams of 16 tokens)
    compare_requests: int = Field(64, ge=1)
    compare_concurrency: int = Field(32, ge=1)
    compare_max_tokens: int = Field(16, ge=1)
    compare_input: LengthDist = Field(default_factory=lambda: LengthDist(median=24, sigma=0.3, min=8, max=64))
    transformers_cb: bool = True  # also run `transformers serve --continuous-batching`
    # Our SmolLM2 replica's CPUs: Ray sets the actor's OMP_NUM_THREADS (torch's threads) from this, so 2
    # lets the one replica use both cores, as transformers serve does.
    smollm2_cpus: float = Field(2, gt=0)
    # latency_throughput
    lt_requests: int = Field(48, ge=1)
    lt_concurrency: int = Field(8, ge=1)
    lt_input: LengthDist = Field(default_factory=lambda: LengthDist(median=120, sigma=0.8, min=8, max=512))
    lt_output: LengthDist = Field(default_factory=lambda: LengthDist(median=48, sigma=0.6, min=4, max=128))
    # routing_policies: bench_routing's arguments
    routing_policies: list[str] = Field(default_factory=lambda: ["round_robin", "pow2", "prefix", "ray_prefix"])
    routing_replicas: int = Field(4, ge=2)
    routing_conversations: int = Field(24, ge=1)
    routing_turns: int = Field(4, ge=1)
    # autoscaling
    as_max_replicas: int = Field(3, ge=2)
    # quiet, burst, then a long quiet tail so the scale-down shows too
    # The burst must outrun one replica (max_num_seqs 2) even on a quiet box.
    as_phases: list[RatePhase] = Field(default_factory=lambda: _burst(0.5, 20.0, before_s=15, burst_s=20, after_s=40))
    as_requests: int = Field(600, ge=1)  # cap; the phases end the workload first
    as_output: LengthDist = Field(default_factory=lambda: LengthDist(median=32, sigma=0.3, min=8, max=64))
    run_deadline_s: float = Field(300, gt=0)  # any one load run
    # soak (optional step)
    soak_minutes: float = Field(20, gt=0)
    soak_model: str = "embedded"

    @classmethod
    def quick(cls, **kw) -> "StandardConfig":
        return cls(**{**dict(
            compare_requests=8, compare_concurrency=8, transformers_cb=False, lt_requests=8, lt_concurrency=4,
            lt_input=LengthDist(median=48, sigma=0.5, min=8, max=128), lt_output=LengthDist(median=16, min=4, max=32),
            routing_policies=["pow2", "prefix"], routing_replicas=2, routing_conversations=4, routing_turns=2,
            as_max_replicas=2, as_phases=_burst(0.5, 30.0, before_s=3, burst_s=5, after_s=5), as_requests=200,
            as_output=LengthDist(median=32, sigma=0.3, min=8, max=64), run_deadline_s=150, soak_minutes=1,
            soak_model="tiny"), **kw})


def _wait_ready(base: str, timeout_s: float = 300) -> None:
    from load_tests.bench_autoscaling import wait_ready
    wait_ready(base, timeout_s)


class _Shared:
    """What a step's process may need: the SmolLM2 cluster (started on first use, stopped before anything
    that needs the machine to itself) and the tiny model."""

    def __init__(self, c: StandardConfig):
        self.c = c
        self._cluster: contextlib.ExitStack | None = None
        self._smollm2: tuple[str, str] | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="llmc-suite-")
        self._tiny: str | None = None

    def smollm2(self) -> tuple[str, str]:
        """(base URL, model id) of a running, warmed-up cluster serving the embedded default on CPU."""
        if self._smollm2 is None:
            from cluster.config import load_config
            from cluster.launcher import running_cluster
            from load_tests.transformers_serve import warm_up
            cfg = load_config(overrides={"engine.device": "cpu", "replicas.num_cpus": self.c.smollm2_cpus,
                                         "router.port": free_port()})
            stack = contextlib.ExitStack()
            try:
                live = stack.enter_context(running_cluster(cfg, dashboard=False, log_to_driver=False))
                base = f"http://127.0.0.1:{live.router.port}"
                _wait_ready(base)
                warm_up(base, live.engine.served_model_id)
            except BaseException:
                stack.close()
                raise
            self._cluster, self._smollm2 = stack, (base, live.engine.served_model_id)
        return self._smollm2

    def release(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = self._smollm2 = None

    def tiny_model(self) -> str:
        if self._tiny is None:
            from load_tests.tiny_model import build_tiny_model
            self._tiny = str(build_tiny_model(Path(self._scratch.name) / "tiny"))
        return self._tiny

    def close(self) -> None:
        self.release()
        self._scratch.cleanup()


def _client(c: StandardConfig, base: str, model: str, **kw) -> ClientConfig:
    return ClientConfig(url=base, model=model, temperature=0.0, deadline_s=c.run_deadline_s,
                        request_timeout_s=c.run_deadline_s, progress=False, **kw)


# ---------------------------------------------------------------- steps


def serving_vs_transformers(c: StandardConfig, shared: _Shared) -> Step:
    def fn(_url: str | None, out: Path) -> dict:
        from load_tests.transformers_serve import transformers_serve
        from replicas.engine.model_prep import prepare_embedded_model
        shared.release()  # transformers serve gets the machine to itself
        out.mkdir(parents=True, exist_ok=True)
        wl = generate(ShareGPTConfig(requests=c.compare_requests, seed=c.seed, input_tokens=c.compare_input,
                                     output_tokens=LengthDist(median=c.compare_max_tokens),
                                     arrival=Arrival(concurrency=c.compare_concurrency)))
        model_dir = prepare_embedded_model()
        runs: dict[str, RunResult] = {}
        for name, cb in ((TRANSFORMERS, False), (TRANSFORMERS_CB, True))[: 2 if c.transformers_cb else 1]:
            log = out / f"{'transformers_serve_cb' if cb else 'transformers_serve'}.log"
            with transformers_serve(model_dir, continuous_batching=cb, log_path=log) as (base, model):
                runs[name] = run_load_sync(wl, _client(c, base, model, require_done=False))
        base, model = shared.smollm2()
        runs[OURS] = run_load_sync(wl, _client(c, base, model))
        ours = runs[OURS].summary.output_throughput
        best = max((n for n in runs if n != OURS), key=lambda n: runs[n].summary.output_throughput)
        theirs = runs[best].summary.output_throughput
        ratio = ours / theirs if theirs else None
        result = {
            "workload": f"{c.compare_requests} chat requests, {c.compare_concurrency} concurrent, "
                        f"max_tokens {c.compare_max_tokens}, temperature 0",
            "output_tok_per_s": {n: r.summary.output_throughput for n, r in runs.items()},
            "output_tokens": {n: r.summary.output_tokens for n, r in runs.items()},
            "ok": {n: f"{r.summary.ok}/{r.summary.sent}" for n, r in runs.items()},
            "ttft_p50_s": {n: r.summary.ttft_s.p50 if r.summary.ttft_s else None for n, r in runs.items()},
            "ratio_vs_best_transformers": ratio, "best_transformers": best, "target_ratio": ">= 3",
            "meets_target": ratio is not None and ratio >= 3,
        }
        notes = (f"Workload: {result['workload']}; same requests to every server, one after the other.\n\n"
                 f"**{OURS}: {ours:.1f} output tok/s; {best}: {theirs:.1f}; ratio "
                 f"{'–' if ratio is None else f'{ratio:.2f}×'}** (DESIGN target ≥ 3×).\n")
        files = write_comparison_report(runs, out,
                                        title="serving: llm-cluster vs transformers serve (SmolLM2-135M, CPU)",
                                        plot=plot_servers, plot_name="serving_throughput", notes=notes,
                                        extra={"comparison": result})
        headline = (f"{OURS} {ours:.1f} tok/s vs {best} {theirs:.1f} tok/s = "
                    f"{'–' if ratio is None else f'{ratio:.2f}×'} (target ≥ 3×)")
        return {"report": files.json_path, "headline": headline, **result}
    return Step("serving_vs_transformers", fn)


def latency_throughput(c: StandardConfig, shared: _Shared) -> Step:
    def fn(_url: str | None, out: Path) -> dict:
        base, model = shared.smollm2()
        cfg = SuiteConfig(requests=c.lt_requests, seed=c.seed, concurrency=c.lt_concurrency, ignore_eos=True,
                          sharegpt_input=c.lt_input, sharegpt_output=c.lt_output, client=_client(c, base, model))
        wl = generate(cfg.workload("sharegpt", Arrival(concurrency=c.lt_concurrency)))
        run = run_load_sync(wl, cfg.client_for(base))
        files = write_run_report(run, out, title=f"SmolLM2-135M on CPU, streaming chat, concurrency {c.lt_concurrency}")
        d = digest(run, files.json_path)
        d["headline"] = (f"{d['output_throughput']:.1f} out tok/s, TTFT p50 {1000 * (d['ttft_p50_s'] or 0):.0f} ms, "
                         f"TPOT p50 {1000 * (d['tpot_p50_s'] or 0):.0f} ms, {d['ok']}/{d['sent']} ok")
        return d
    return Step("latency_throughput", fn)


def routing_targets(by_policy: dict[str, dict]) -> dict | None:
    """DESIGN's cluster targets, prefix against pow2, from bench_routing's per-policy results."""
    p, q = by_policy.get("prefix"), by_policy.get("pow2")
    if not p or not q:
        return None
    hit = p["hit_rate_client"] / q["hit_rate_client"] if p["hit_rate_client"] and q["hit_rate_client"] else None
    ttft = q["ttft_p50_ms"] / p["ttft_p50_ms"] if p["ttft_p50_ms"] and q["ttft_p50_ms"] else None
    load = p["inflight_max_over_mean"]
    return {"hit_rate_ratio": hit, "ttft_p50_speedup": ttft, "prefix_busiest_over_mean_inflight": load,
            "targets": {"hit_rate_ratio": ">= 3", "ttft_p50_speedup": ">= 2",
                        "prefix_busiest_over_mean_inflight": "<= 1.5"},
            "met": {"hit_rate_ratio": hit is not None and hit >= 3, "ttft_p50_speedup": ttft is not None and ttft >= 2,
                    "prefix_busiest_over_mean_inflight": load is not None and load <= 1.5}}


def routing_policies(c: StandardConfig, shared: _Shared) -> Step:
    def fn(_url: str | None, out: Path) -> dict:
        from load_tests import bench_routing
        shared.release()  # bench_routing starts a Ray instance of its own
        raw = out / "bench_routing"
        bench_routing.main(["--policies", ",".join(c.routing_policies), "--replicas", str(c.routing_replicas),
                            "--conversations", str(c.routing_conversations), "--turns", str(c.routing_turns),
                            "--seed", str(c.seed), "--deadline-s", str(c.run_deadline_s), "--out", str(raw)])
        report = json.loads((raw / "results.json").read_text())
        by_policy = {r["policy"]: r for r in report["results"]}
        runs = {p: RunResult.model_validate_json((raw / f"run_{p}.json").read_text()) for p in by_policy}
        targets = routing_targets(by_policy)
        f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
        notes = "## Replica-side view (bench_routing)\n\n" + bench_routing.table(report["results"]) + "\n"
        if targets:
            notes += (f"\nprefix vs pow2 (DESIGN targets): hit rate ×{f(targets['hit_rate_ratio'], '.2f')} (≥ 3), "
                      f"TTFT p50 speedup ×{f(targets['ttft_p50_speedup'], '.2f')} (≥ 2), busiest/mean in-flight "
                      f"{f(targets['prefix_busiest_over_mean_inflight'], '.2f')} (≤ 1.5)\n")
        files = write_comparison_report(runs, out, title=f"routing policies ({c.routing_replicas} replicas, "
                                        f"multi-turn shared prefix)", notes=notes,
                                        extra={"bench_routing": report, "prefix_vs_pow2": targets})
        keep = ("ok", "sent", "hit_rate_client", "hit_rate_engine", "ttft_p50_ms", "ttft_p99_ms", "out_tok_per_s",
                "inflight_max_over_mean", "prompt_share_max_over_mean")
        headline = ", ".join(f"{p} hit {f(r['hit_rate_client'], '.0%')} TTFT p50 {f(r['ttft_p50_ms'], '.0f')} ms"
                             for p, r in by_policy.items())
        return {"report": files.json_path, "headline": headline, "prefix_vs_pow2": targets,
                "policies": {p: {k: r.get(k) for k in keep} for p, r in by_policy.items()}}
    return Step("routing_policies", fn)


def scaling_timeline(points: list[TimePoint], min_replicas: int = 1) -> dict:
    """When the cluster asked for more replicas, when they ran, the peak, and when it was back to the
    minimum, from the status samples (s from run start)."""
    def first(pred, after: float = -1.0):
        return next((p.t_s for p in points if p.t_s > after and pred(p.values)), None)
    run = lambda v: v.get("replicas", 0)  # noqa: E731
    up = first(lambda v: v.get("replicas_target", 0) > min_replicas)
    running = first(lambda v: run(v) > min_replicas)
    peak = int(max((run(p.values) for p in points), default=0))
    t_peak = first(lambda v: run(v) == peak)
    down = first(lambda v: run(v) == min_replicas and v.get("replicas_target", 0) == min_replicas,
                 after=t_peak) if t_peak is not None and peak > min_replicas else None
    return {"scale_up_decided_s": up, "more_replicas_running_s": running, "peak_replicas": peak,
            "peak_at_s": t_peak, "back_to_min_s": down,
            "max_queue_depth": max((p.values.get("queue_depth", 0) for p in points), default=0)}


def _status_source(app: str):
    """Async status callable for the sampler: replicas RUNNING, wanted (all but STOPPING), and the queue
    (requests waiting in the engines, summed over replicas)."""
    from ray import serve

    from load_tests.bench_autoscaling import REPLICA, replica_states
    from load_tests.bench_routing import replica_stats
    handle = serve.get_deployment_handle(REPLICA, app)

    def snapshot() -> dict:
        states = replica_states(app)
        stats = replica_stats(handle, timeout_s=1.5)
        return {"replicas": states.get("RUNNING", 0),
                "replicas_target": sum(n for s, n in states.items() if s != "STOPPING"),
                "queue_depth": sum(s["num_waiting"] for s in stats.values()),
                "running_requests": sum(s["num_running"] for s in stats.values())}

    async def status() -> dict:
        return await asyncio.to_thread(snapshot)
    return status


def autoscaling(c: StandardConfig, shared: _Shared) -> Step:
    def fn(_url: str | None, out: Path) -> dict:
        from cluster.launcher import running_cluster
        from load_tests.bench_autoscaling import autoscaling_config, running_replicas, wait_for
        shared.release()
        cfg = autoscaling_config(shared.tiny_model(), **{"router.port": free_port(),
                                                         "autoscaling.max_replicas": c.as_max_replicas})
        with running_cluster(cfg, num_cpus=8, dashboard=False, log_to_driver=False) as live:
            base = f"http://127.0.0.1:{live.router.port}"
            _wait_ready(base)
            wait_for(lambda: running_replicas(live.app_name) == cfg.autoscaling.min_replicas, 120,
                     what="the minimum replicas")
            suite_cfg = SuiteConfig(requests=c.as_requests, seed=c.seed, ramp=c.as_phases, ignore_eos=True,
                                    sharegpt_input=LengthDist(median=32, sigma=0.5, min=8, max=96),
                                    sharegpt_output=c.as_output,
                                    client=_client(c, base, live.engine.served_model_id, status_interval_s=1.0))
            d = autoscaling_step(suite_cfg, _status_source(live.app_name)).fn(base, out)
        run = RunResult.model_validate(json.loads(Path(d["report"]).read_text())["run"])
        timeline = scaling_timeline(run.timeseries, cfg.autoscaling.min_replicas)
        burst_at = c.as_phases[0].duration_s
        f = lambda x: "–" if x is None else f"{x:.1f} s"  # noqa: E731
        d.update(timeline, burst_starts_s=burst_at, max_replicas=c.as_max_replicas, headline=(
            f"burst at {burst_at:.0f} s: scale-up decided {f(timeline['scale_up_decided_s'])}, 2nd replica running "
            f"{f(timeline['more_replicas_running_s'])}, peak {timeline['peak_replicas']} replicas, back to "
            f"{cfg.autoscaling.min_replicas} at {f(timeline['back_to_min_s'])}; {d['ok']}/{d['sent']} ok"))
        with open(Path(d["report"]).with_suffix(".md"), "a") as md:
            md.write(f"\nTimeline (s from run start): {d['headline']}\n")
        return d
    return Step("autoscaling", fn)


def soak(c: StandardConfig, shared: _Shared) -> Step:
    def fn(_url: str | None, out: Path) -> dict:
        from load_tests.soak import SoakConfig, run_soak
        shared.release()  # the soak starts a Ray instance of its own
        cfg = SoakConfig(minutes=c.soak_minutes, model=c.soak_model, seed=c.seed, progress=False)
        if c.soak_minutes < 3:  # a short soak: one kill and one Redis kill early enough to see them through
            cfg = cfg.model_copy(update={"kill_at_s": [c.soak_minutes * 15], "redis_kill_at_s": c.soak_minutes * 30,
                                         "redis_down_s": c.soak_minutes * 12, "warmup_s": c.soak_minutes * 10})
        r = run_soak(cfg, out)
        v, req = r["verdict"], r["requests"]
        headline = (f"{req['ok']}/{req['sent']} ok, {req['cancelled_by_client']} cancelled by the client, "
                    f"undocumented errors {sum(req['undocumented_errors'].values())}, documented "
                    f"{sum(req['documented_errors'].values())}; RSS flat {v['rss_flat']}, KV idle {v['kv_idle']}, "
                    f"{len(r['replica_kills'])} replica kills replaced {v['replica_kills_recovered']}")
        return {"report": str(out / "results.json"), "headline": headline, "verdict": v,
                "requests": {k: req[k] for k in ("sent", "ok", "cancelled_by_client", "errors")}}
    return Step("soak", fn)


STEPS = (serving_vs_transformers, latency_throughput, routing_policies, autoscaling)
OPTIONAL_STEPS = (soak,)  # run only when named in `only`: a soak takes soak_minutes


def machine_info() -> dict:
    import ray
    import torch
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return {"machine": f"{platform.node()}: {cpu}, {os.cpu_count()} cores", "python": platform.python_version(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}",
            "commit": commit, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def run_standard_suite(out_dir: str | Path, *, quick: bool = False, only: list[str] | None = None,
                       config: StandardConfig | None = None, progress: bool = True) -> dict:
    """Run the standard steps into out_dir; returns each step's digest (suite.json holds them too)."""
    c = config or (StandardConfig.quick() if quick else StandardConfig())
    factories = STEPS + tuple(f for f in OPTIONAL_STEPS if only and f.__name__ in only)
    return run_suite(None, out_dir, [_in_own_process(step, c) for step in factories], only=only,
                     meta={**machine_info(), "mode": "quick" if quick else "full"}, progress=progress)


def _in_own_process(factory, c: StandardConfig) -> Step:
    """The step `factory(c, shared)` builds (`factory`: a module-level function), run in a fresh process.
    Ray does not reliably start again in a process that has shut it down (a suite died of SIGSEGV between
    two steps' clusters, once in five runs on the 2-core VM), and a step whose process crashes loses only
    its own result."""
    name = factory.__name__

    def fn(_url: str | None, out: Path) -> dict:
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_run_step_alone, args=(factory, c, out, send), name=f"llmc-suite-{name}")
        proc.start()
        send.close()
        try:
            status, payload = recv.recv()
        except EOFError:
            proc.join(10)
            raise RuntimeError(f"the step's process died before reporting (exit code {proc.exitcode})") from None
        finally:
            recv.close()
            proc.join(120)
            if proc.is_alive():  # it reported but does not exit: ours to end
                proc.kill()
                proc.join()
        if status == "error":
            error, child_traceback = payload
            raise RuntimeError(error) from _ChildTraceback(child_traceback)
        return payload
    return Step(name, fn)


class _ChildTraceback(Exception):
    """A step process's traceback, chained under the error the suite records."""


def _run_step_alone(factory, c: StandardConfig, out: Path, send) -> None:
    # Ray's driver logging setup lets httpx log every request at INFO: thousands of lines per step.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    shared = _Shared(c)
    try:
        step = factory(c, shared)
        result = ("ok", step.fn(None, out))
    except Exception as e:  # noqa: BLE001 - reported to the suite, which records it beside the other steps
        result = ("error", (f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        shared.close()
    send.send(result)
    send.close()
