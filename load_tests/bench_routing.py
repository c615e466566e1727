"""Routing policies side by side on CPU: round_robin, pow2, prefix (ours) and Ray Serve LLM's
PrefixCacheAffinityRouter, each on a fresh cluster of small random-weight replicas, same multi-turn workload.

    python -m load_tests.bench_routing [--replicas 4] [--conversations 48] [--out /tmp/bench_routing]

The model (`--model bench`, load_tests.bench_model) is one whose answers round-trip through the chat
template, as a trained model's do, so a turn can reuse the previous turn's answer too; `--model tiny` is
the tests' BPE model (hidden 64), whose random answers re-tokenize differently. Each replica's KV pool is
sized from the workload (`--kv-headroom` times the fleet's share of its working set: every conversation's
final context), so that the fleet holds the working set only if each conversation stays on one replica.

Per policy: deploy the app (replica caches and the Redis index start empty), run the seeded multi-turn
shared-prefix workload closed-loop through the HTTP API, and record from the client: prefix hit rate
(usage.cached_tokens / prompt tokens), TTFT p50/p99, throughput, failures; from the replicas (stats
broadcast): the engines' own hit rate, each replica's share of prompt tokens and its time-averaged
in-flight requests (busiest / mean); from Ray's metrics export: our router's decision outcomes.

Before the runs it prints what the workload allows (load_tests.routing_model, `--model-only` to stop there):
the hit rate with each conversation kept on one replica (the ceiling) and with a random replica per request
(where pow2 lands), for this fleet and cache size.

The Ray baseline: load_tests.ray_prefix_baseline (its defaults, our request type).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import httpx

from replicas.protocol import ReplicaStats

APP = "llm-cluster"
POLICIES = ("round_robin", "pow2", "prefix", "ray_prefix")
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- cluster

def make_config(model_dir: str, redis_url: str, policy: str, args):
    from cluster.config import load_config
    return load_config(overrides={
        "engine.model": model_dir, "engine.device": "cpu", "engine.block_size": args.block_size,
        "engine.num_kv_blocks": args.kv_blocks_resolved, "engine.max_num_seqs": 16,
        "replicas.num_replicas": args.replicas, "replicas.num_cpus": 0.5, "redis_url": redis_url,
        "router.policy": "prefix" if policy == "ray_prefix" else policy,
        "router.redis_timeout_ms": args.redis_timeout_ms,
        **({} if args.prefix_weight is None else {"router.prefix_weight": args.prefix_weight}),
        **dict(o.split("=", 1) for o in args.overrides)})


def deploy(cfg, policy: str) -> None:
    from ray import serve

    from cluster.app import build_app_from_config, ingress_options, replica_options
    if policy != "ray_prefix":
        serve.run(build_app_from_config(cfg), name=APP, route_prefix="/", blocking=False)
        return
    from ray.serve.config import RequestRouterConfig

    from replicas.deployment import LLMReplica
    from router.api import OpenAIIngress
    opts = replica_options(cfg)
    opts["request_router_config"] = RequestRouterConfig(
        request_router_class="load_tests.ray_prefix_baseline.RayPrefixCacheAffinityRouter",
                                                        request_routing_stats_period_s=0.5)
    replica = serve.deployment(LLMReplica).options(**opts).bind(cfg.replica_config())
    serve.run(serve.deployment(OpenAIIngress).options(**ingress_options(cfg)).bind(cfg.ingress_config(), replica),
              name=APP, route_prefix="/", blocking=False)


def wait_ready(base: str, handle, replicas: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=3).status_code == 200 and len(replica_stats(handle)) == replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("cluster not ready")


def replica_stats(handle, timeout_s: float = 20) -> dict[str, dict]:
    results = handle.broadcast("stats").results(timeout_s=timeout_s, return_exceptions=True)
    return {s.replica_id: s.model_dump() for s in results if isinstance(s, ReplicaStats)}


def ray_metrics(port: int, name: str = "llmc_routing_decisions_total", label: str = "outcome",
                where: str = "") -> dict[str, float]:
    """One of our counters from the node's Prometheus export, summed by one label over the rest
    (only series whose labels contain `where`, e.g. 'component="router"')."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for m in re.finditer(rf'^ray_{name}\{{([^}}]*)\}} ([0-9.e+]+)$', text, re.M):
        value = re.search(rf'{label}="([^"]+)"', m.group(1))
        if value and where in m.group(1):
            out[value.group(1)] = out.get(value.group(1), 0.0) + float(m.group(2))
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


LOOKUP_BUCKETS = "llmc_router_index_lookup_seconds_bucket"


def lookup_latency(after: dict[str, float], before: dict[str, float], timeout_s: float) -> dict | None:
    """From the router's lookup-latency histogram (cumulative bucket counts by `le`, before and after a run):
    how many lookups answered, the bucket bounds holding their p50 and p99, the share within `timeout_s`,
    and the cumulative counts themselves (what a shorter budget would have kept)."""
    cum = sorted((float(le), n - before.get(le, 0.0)) for le, n in after.items())
    if not cum or cum[-1][1] <= 0:
        return None
    total = cum[-1][1]
    bound = lambda q: next(le for le, n in cum if n >= q * total)  # noqa: E731
    within = max((n for le, n in cum if le <= timeout_s), default=0.0)
    return {"answered": total, "p50_le_s": bound(0.5), "p99_le_s": bound(0.99), "within_timeout_share": within / total,
            "cumulative": {str(le): n for le, n in cum}}


# ---------------------------------------------------------------- one policy

def workload(args):
    from load_tests.workloads import Arrival, LengthDist, MultiTurnConfig, generate
    return generate(MultiTurnConfig(
        seed=args.seed, conversations=args.conversations, turns=args.turns, system_prompts=4,
        sharing_ratio=args.sharing_ratio,
        system_prompt_tokens=args.system_words, max_tokens=args.max_tokens, ignore_eos=True,
        user_tokens=LengthDist(median=args.user_words, sigma=0.3, min=8, max=4 * args.user_words),
        arrival=Arrival(concurrency=args.concurrency)))


def model_line(model) -> str:
    return (f"Workload model (load_tests/routing_model.py, same requests and cache size): each conversation kept on "
            f"one replica {model.affinity:.1%} (the workload's ceiling), a random replica per request "
            f"{model.random:.1%} (pow2's lot): ×{model.ratio:.2f}")


def run_policy(policy: str, model_dir: str, redis, base: str, metrics_port: int, args, rnd: int = 0) -> dict:
    import redis as redis_lib
    from ray import serve

    from load_tests.client import ClientConfig, run_load_sync

    client = redis_lib.Redis.from_url(redis.url)
    client.flushall()
    client.close()
    cfg = make_config(model_dir, redis.url, policy, args)
    t0 = time.monotonic()
    deploy(cfg, policy)
    handle = serve.get_deployment_handle("LLMReplica", app_name=APP)
    wait_ready(base, handle, args.replicas)
    print(f"[{policy}] cluster ready in {time.monotonic() - t0:.0f}s", flush=True)
    decisions_before = ray_metrics(metrics_port)
    fallbacks_before = ray_metrics(metrics_port, "llmc_redis_fallbacks_total", "reason", 'component="router"')
    lookups_before = ray_metrics(metrics_port, LOOKUP_BUCKETS, "le")
    before = replica_stats(handle)
    load_start = os.getloadavg()[0]

    async def inflight():
        stats = await asyncio.to_thread(replica_stats, handle)
        return {rid: s["num_waiting"] + s["num_running"] for rid, s in stats.items()}

    run = run_load_sync(workload(args), ClientConfig(url=base, temperature=0.0, deadline_s=args.deadline_s,
                                               status_interval_s=0.5, progress=False), status=inflight)
    after = replica_stats(handle)
    time.sleep(args.metrics_wait_s)  # one Ray metrics report interval
    decisions = _delta(ray_metrics(metrics_port), decisions_before)
    fallbacks = _delta(ray_metrics(metrics_port, "llmc_redis_fallbacks_total", "reason", 'component="router"'),
                       fallbacks_before)
    lookups = lookup_latency(ray_metrics(metrics_port, LOOKUP_BUCKETS, "le"), lookups_before,
                             args.redis_timeout_ms / 1000)
    serve.delete(APP)

    s = run.summary
    prompt = {rid: after[rid]["prefix_query_tokens"] - before.get(rid, {}).get("prefix_query_tokens", 0)
              for rid in after}
    hit = sum(after[rid]["prefix_hit_tokens"] - before.get(rid, {}).get("prefix_hit_tokens", 0) for rid in after)
    busy = [p.values for p in run.timeseries if sum(p.values.values()) > 0]
    avg_inflight = {rid: sum(v.get(rid, 0.0) for v in busy) / len(busy) for rid in after} if busy else {}
    mean_share = sum(prompt.values()) / len(prompt)
    mean_inflight = sum(avg_inflight.values()) / len(avg_inflight) if avg_inflight else 0.0
    result = {
        "policy": policy, "ok": s.ok, "sent": s.sent, "failed": s.failed, "errors": s.errors,
        "duration_s": s.duration_s, "req_per_s": s.request_throughput, "out_tok_per_s": s.output_throughput,
        "hit_rate_client": s.cache_hit_rate, "hit_rate_engine": hit / sum(prompt.values()) if prompt else None,
        "ttft_p50_ms": s.ttft_s.p50 * 1000 if s.ttft_s else None,
        "ttft_p99_ms": s.ttft_s.p99 * 1000 if s.ttft_s else None,
        "e2e_p50_ms": s.e2e_s.p50 * 1000 if s.e2e_s else None,
        "prompt_tokens_by_replica": prompt,
        "prompt_share_max_over_mean": max(prompt.values()) / mean_share if mean_share else None,
        "inflight_by_replica": avg_inflight,
        "inflight_max_over_mean": max(avg_inflight.values()) / mean_inflight if mean_inflight else None,
        "router_decisions": decisions, "redis_fallbacks": fallbacks, "index_lookups": lookups,
        "load_average_1m": (load_start, os.getloadavg()[0]),  # the workload's start and end
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"run_{policy}{f'_r{rnd + 1}' if rnd else ''}.json").write_text(run.model_dump_json())
    print(f"[{policy}] " + json.dumps({k: v for k, v in result.items() if k not in ("prompt_tokens_by_replica",
                                                                                  "inflight_by_replica")},
                                      default=lambda x: round(x, 3)), flush=True)
    return result


def run_rounds(policies: list[str], rounds: int, run_one, results: list[dict], on_result) -> None:
    """Every policy once per round, the order rotated each round (no policy always first on a cold box);
    `on_result` after each, so a run cut short keeps what it measured."""
    for rnd in range(rounds):
        for policy in policies[rnd % len(policies):] + policies[:rnd % len(policies)]:
            results.append({"round": rnd, **run_one(policy, rnd)})
            on_result()


def table(results: list[dict]) -> str:
    f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    lines = ["| policy | ok/sent | prefix hit rate (client / engine) | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | "
             "req/s | out tok/s | busiest/mean prompt tokens | busiest/mean in-flight |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = r["policy"] if "round" not in r else f"{r['policy']} (round {r['round'] + 1})"
        lines.append(f"| {name} | {r['ok']}/{r['sent']} | {f(r['hit_rate_client'], '.1%')} / "
                     f"{f(r['hit_rate_engine'], '.1%')} | {f(r['ttft_p50_ms'], '.0f')} | "
                     f"{f(r['ttft_p99_ms'], '.0f')} | "
                     f"{f(r['e2e_p50_ms'], '.0f')} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
                     f"{f(r['prompt_share_max_over_mean'], '.2f')} | {f(r['inflight_max_over_mean'], '.2f')} |")
    return "\n".join(lines)


def medians(results: list[dict], policies: list[str]) -> list[dict]:
    """Per policy, the median over rounds of every number in the table."""
    import statistics
    out = []
    for policy in policies:
        rows = [r for r in results if r["policy"] == policy]
        med = {"policy": f"{policy} (median of {len(rows)})", "ok": sum(r["ok"] for r in rows),
               "sent": sum(r["sent"] for r in rows)}
        for k in ("hit_rate_client", "hit_rate_engine", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "req_per_s",
                  "out_tok_per_s", "prompt_share_max_over_mean", "inflight_max_over_mean"):
            values = [r[k] for r in rows if r[k] is not None]
            med[k] = statistics.median(values) if values else None
        out.append(med)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--model", choices=("bench", "tiny"), default="bench",
                   help="bench: load_tests.bench_model (answers round-trip, one token per word); tiny: the tests' "
                   "BPE model (hidden 64, 2 layers, ~4 tokens per word, answers do not round-trip)")
    p.add_argument("--hidden", type=int, default=384, help="bench model width (heads of 64)")
    p.add_argument("--layers", type=int, default=6, help="bench model depth")
    p.add_argument("--replicas", type=int, default=4, help="the issue's 3-4 (sessions 2-4 ran 6)")
    p.add_argument("--conversations", type=int, default=48)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--system-words", type=int, default=32, help="system prompt length in words")
    p.add_argument("--sharing-ratio", type=float, default=0.75, help="share of conversations on the 4 common "
                   "system prompts (the others have their own)")
    p.add_argument("--user-words", type=int, default=128, help="median user turn length")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks per replica (default: from "
                   "--kv-headroom)")
    p.add_argument("--kv-headroom", type=float, default=1.0, help="fleet KV capacity over the workload's "
                   "working set (every conversation's final context), split evenly over the replicas: 1.0 holds "
                   "it once, as full caches do (sessions 2-4 ran 1.25, where a random pick's stale copies survive: "
                   "docs/benchmarks.md, Routing policies, session 5)")
    # Not the config's budget: where replicas share a few cores with the router, its lookups wait for CPU and
    # a tight budget sends most decisions to the load-only fallback, so the run would not measure the policy.
    p.add_argument("--redis-timeout-ms", type=float, default=250.0, help="router.redis_timeout_ms for the run")
    p.add_argument("--prefix-weight", type=float, default=None, help="default: the config's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other config override for every policy's app, e.g. router.balance_slack=8")
    p.add_argument("--rounds", type=int, default=1, help="each round runs every policy once, in rotated order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=900)
    p.add_argument("--metrics-wait-s", type=float, default=3.0)
    p.add_argument("--model-only", action="store_true", help="print the workload model's hit rates "
                   "(load_tests/routing_model.py) for these settings and stop, without starting a cluster")
    p.add_argument("--out", default=None, help="directory for results.json, results.md and each run's raw results")
    args = p.parse_args(argv)
    for name in ("replicas", "conversations", "turns", "concurrency", "block_size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.kv_headroom <= 0 or (args.kv_blocks is not None and args.kv_blocks < 1):
        p.error("the KV pool must be positive (--kv-headroom > 0, --kv-blocks >= 1)")

    import ray
    from ray import serve

    from cluster.ports import free_port
    from cluster.redis_server import EmbeddedRedis

    model_dir = tempfile.mkdtemp(prefix="llmc-bench-model-")
    if args.model == "bench":
        from load_tests.bench_model import build_bench_model
        build_bench_model(model_dir, hidden=args.hidden, layers=args.layers, num_heads=max(1, args.hidden // 64))
    else:
        from load_tests.tiny_model import build_tiny_model
        build_tiny_model(model_dir)
    from transformers import AutoTokenizer

    from load_tests import routing_model
    requests = routing_model.requests_of(workload(args), AutoTokenizer.from_pretrained(model_dir))
    if args.kv_blocks is None:
        ws = routing_model.working_set_blocks(requests, args.block_size)
        args.working_set_blocks = ws
        args.kv_blocks_resolved = max(64, -(-int(ws * args.kv_headroom) // args.replicas))
    else:
        args.kv_blocks_resolved = args.kv_blocks
    print(f"KV blocks per replica: {args.kv_blocks_resolved}", flush=True)
    model = routing_model.hit_rates(requests, args.replicas, args.kv_blocks_resolved, args.block_size, seed=args.seed)
    print(model_line(model), flush=True)
    if args.model_only:
        return 0
    load_start = os.getloadavg()
    metrics_port = free_port()
    ray.init(address="local", num_cpus=2 * args.replicas + 4, include_dashboard=False, log_to_driver=False,
             namespace="llmc-bench", runtime_env={"env_vars": ENV}, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results = []
    report = {"machine": f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_start": load_start, "args": vars(args),
              "model_hit_rates": {"affinity": model.affinity, "random": model.random, "ratio": model.ratio},
              "results": results}

    def save(complete: bool) -> None:
        if args.out:  # after every policy too, so a run cut short keeps what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            report.update(complete=complete, load_average_end=os.getloadavg())
            (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1, default=str))

    policies = args.policies.split(",")
    try:
        with EmbeddedRedis() as redis:
            run_rounds(policies, args.rounds, lambda policy, rnd: run_policy(policy, model_dir, redis, base,
                                                                             metrics_port, args, rnd),
                       results, lambda: save(complete=False))
    finally:
        serve.shutdown()
        ray.shutdown()
    md = (table(results) if args.rounds == 1
          else table(medians(results, policies)) + "\n\nEach round:\n\n" + table(results))
    from load_tests.standard import routing_targets
    rows = results if args.rounds == 1 else medians(results, policies)
    targets = routing_targets({r["policy"].split(" ")[0]: r for r in rows})
    if targets:
        report["prefix_vs_pow2"] = targets
        md += ("\n\nprefix vs pow2: hit rate ×{hit_rate_ratio:.2f} (≥ 3), TTFT p50 ×{ttft_p50_speedup:.2f} (≥ 2), "
               "prefix busiest/mean in-flight {prefix_busiest_over_mean_inflight:.2f} (≤ 1.5)".format(**targets))
    md += "\n\n" + model_line(model)
    print(md)
    if args.out:
        save(complete=True)
        (Path(args.out) / "results.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
