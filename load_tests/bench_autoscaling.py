"""Autoscaling and recovery on CPU: how fast a queue burst gets replicas running, and how fast a stuck
replica is replaced, on a real local Ray cluster with the tiny random-weight model.

    python -m load_tests.bench_autoscaling [--runs 3] [--out docs/autoscaling.json]

Scale-up: deploy with autoscaling (min 1), start a closed-loop burst, time until the policy's decision
and until 3 replicas are RUNNING. Replacement: 2 fixed replicas, inject an engine stall into one, time
until it is gone and until a new replica has served a request. Every request's outcome is counted.
The helpers here (load loop, replica poll, controller log reader) are also what the e2e tests use.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx

APP = "llm-cluster"
REPLICA = "LLMReplica"
TEST_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "LLM_CLUSTER_FAULT_INJECTION": "1"}


# ---------------------------------------------------------------- cluster probes


def replica_states(app: str = APP) -> dict[str, int]:
    """LLMReplica replica counts by state (RUNNING, STARTING, STOPPING, ...)."""
    from ray import serve
    st = serve.status().applications.get(app)
    if st is None or REPLICA not in st.deployments:
        return {}
    return {str(k): v for k, v in st.deployments[REPLICA].replica_states.items()}


def running_replicas(app: str = APP) -> int:
    return replica_states(app).get("RUNNING", 0)


def wait_for(pred, timeout_s: float, period_s: float = 0.1, what: str = "condition") -> float:
    """Seconds until pred() is true; TimeoutError after timeout_s."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} not reached within {timeout_s}s (replicas: {replica_states()})")
        time.sleep(period_s)
    return time.monotonic() - t0


def controller_logs() -> list[str]:
    import ray
    logs = ray._private.worker._global_node.get_logs_dir_path()
    return sorted(glob.glob(os.path.join(logs, "serve", "controller_*.log")))


class LogTail:
    """Lines appended to the Serve controller's log since construction."""

    def __init__(self):
        self.offsets = {p: os.path.getsize(p) for p in controller_logs()}

    def lines(self, contains: str = "") -> list[str]:
        out = []
        for p in controller_logs():
            with open(p, errors="replace") as f:
                f.seek(self.offsets.get(p, 0))
                out += [ln.rstrip("\n") for ln in f if contains in ln]
        return out


def scaling_decisions(tail: LogTail) -> list[str]:
    return tail.lines(f"autoscale {REPLICA} ")


# ---------------------------------------------------------------- load


@dataclass
class LoadStats:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class ClosedLoop:
    """`concurrency` clients, each sending /v1/completions back to back until stop(); in a thread with
    its own event loop so the caller can poll Serve meanwhile. Failed = any non-200 or transport error."""

    def __init__(self, base: str, concurrency: int, max_tokens: int = 32, timeout_s: float = 60.0,
                 prompt: str = "The quick brown fox jumps over the lazy dog."):
        self.base, self.concurrency, self.max_tokens, self.timeout_s = base, concurrency, max_tokens, timeout_s
        self.prompt = prompt
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> "ClosedLoop":
        self._thread.start()
        return self

    def set_concurrency(self, n: int) -> None:
        self.concurrency = n  # clients above n stop after their current request

    def stop(self, join_s: float = 90.0) -> LoadStats:
        self._stop.set()
        self._thread.join(join_s)
        if self._thread.is_alive():
            raise TimeoutError("load clients did not finish their last requests")
        return self.stats

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=self.timeout_s) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.concurrency)))

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"{self.prompt} {i}", "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True}
        while not self._stop.is_set() and i < self.concurrency:
            t0 = time.monotonic()
            try:
                r = await http.post("/v1/completions", json=body)
                good = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == self.max_tokens
                err = None if good else f"{r.status_code}: {r.text[:200]}"
            except Exception as e:  # noqa: BLE001 - every failure is counted, none hidden
                err = f"{type(e).__name__}: {e}"
            if err is None:
                self.stats.ok += 1
                self.stats.latencies.append(time.monotonic() - t0)
            else:
                self.stats.failed += 1
                self.stats.errors.append(err)


def complete(base: str, prompt: str = "hello", max_tokens: int = 8, timeout_s: float = 60.0) -> dict:
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                  "ignore_eos": True}, timeout=timeout_s)
    r.raise_for_status()
    return r.json()


# ---------------------------------------------------------------- configs


def tiny_config(model_dir: str, **overrides):
    """A CPU config on the tiny model; `overrides` are dotted keys (`autoscaling.max_replicas=4`)."""
    from cluster.config import load_config
    base = {"engine.model": str(model_dir), "engine.device": "cpu", "engine.num_kv_blocks": 256,
            "engine.block_size": 4, "engine.max_num_seqs": 2, "replicas.num_cpus": 0.5,
            "replicas.health_check_period_s": 0.5, "replicas.health_check_timeout_s": 5,
            "replicas.stall_timeout_s": 2, "replicas.graceful_shutdown_timeout_s": 20,
            "router.policy": "pow2"}
    base.update(overrides)
    return load_config(overrides=base)


def autoscaling_config(model_dir: str, **overrides):
    return tiny_config(model_dir, **{
        "autoscaling.enabled": True, "autoscaling.min_replicas": 1, "autoscaling.max_replicas": 4,
        "autoscaling.target_waiting_per_replica": 2, "autoscaling.upscale_delay_s": 0.5,
        "autoscaling.downscale_delay_s": 4, "autoscaling.metrics_interval_s": 0.25,
        "autoscaling.look_back_period_s": 1.0, **overrides})


# ---------------------------------------------------------------- measurements


def deploy(cfg) -> None:
    from ray import serve

    from cluster.app import build_app_from_config
    serve.run(build_app_from_config(cfg), name=APP, route_prefix="/", blocking=False)


def wait_ready(base: str, timeout_s: float = 120.0) -> None:
    def ok():
        try:
            return httpx.get(base + "/ready", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(ok, timeout_s, 0.5, "app ready")


def measure_scale_up(base: str, model_dir: str, concurrency: int = 10, target: int = 3, **overrides) -> dict:
    """Burst -> first decision line and -> `target` replicas RUNNING; then idle -> back to 1. Every
    request of the burst is counted; the decision lines logged meanwhile come back too."""
    from ray import serve
    try:  # a deploy that times out (a test's timeout fires inside serve.run) must still be deleted
        deploy(autoscaling_config(model_dir, **{"autoscaling.max_replicas": target, **overrides}))
        wait_ready(base)
        wait_for(lambda: running_replicas() == 1, 60, what="1 replica")
        tail = LogTail()
        load = ClosedLoop(base, concurrency, max_tokens=48).start()
        try:
            t0 = time.monotonic()
            wait_for(lambda: scaling_decisions(tail), 60, what="a scale-up decision")
            decision_s = time.monotonic() - t0
            wait_for(lambda: running_replicas() >= target, 90, what=f"{target} replicas")
            running_s = time.monotonic() - t0
            time.sleep(2)  # the new replicas serve part of the burst
        finally:
            stats = load.stop()
        t1 = time.monotonic()
        wait_for(lambda: replica_states() == {"RUNNING": 1}, 90, what="back to 1")
        down_s = time.monotonic() - t1
    finally:
        serve.delete(APP)
    return {"decision_s": decision_s, "replicas_running_s": running_s, "scale_down_after_idle_s": down_s,
            "requests_ok": stats.ok, "requests_failed": stats.failed, "errors": stats.errors[:5],
            "decisions": scaling_decisions(tail)}


def replica_ids(base: str, n: int = 24) -> set[str]:
    """Replica ids that answered `n` model_info calls through a handle (pow2 spreads them)."""
    from ray import serve
    h = serve.get_deployment_handle(REPLICA, APP)
    ids = set()
    for _ in range(n):
        try:
            ids.add(h.model_info.remote().result(timeout_s=10).replica_id)
        except Exception:  # noqa: BLE001 - a replica dying under the call: ask again
            pass
    return ids


def measure_replacement(base: str, model_dir: str, **overrides) -> dict:
    """2 replicas under load, one stalled: time until Serve drops it (the replica exits once the stall
    outlasts stall_timeout_s; Serve logs it crashed) and until its replacement has served a request."""
    from ray import serve
    try:  # deleted even when the deploy itself times out
        deploy(tiny_config(model_dir, **{"replicas.num_replicas": 2, **overrides}))
        wait_ready(base)
        wait_for(lambda: running_replicas() == 2, 60, what="2 replicas")
        before = replica_ids(base)
        tail = LogTail()
        load = ClosedLoop(base, 4, max_tokens=16).start()
        try:
            time.sleep(1)
            stuck = serve.get_deployment_handle(REPLICA, APP)._inject_fault.remote("stall").result(timeout_s=30)
            t0 = time.monotonic()
            wait_for(lambda: any("crashed" in ln for ln in tail.lines(f"id='{stuck}'")), 60,
                     what="stuck replica dropped")
            removed_s = time.monotonic() - t0
            wait_for(lambda: running_replicas() == 2 and replica_ids(base, 8) - before, 90, what="replacement serving")
            replaced_s = time.monotonic() - t0
            time.sleep(1)
        finally:
            stats = load.stop()
    finally:
        serve.delete(APP)
    return {"stall_to_dropped_s": removed_s, "stall_to_replacement_serving_s": replaced_s,
            "requests_ok": stats.ok, "requests_failed": stats.failed, "max_latency_s": max(stats.latencies),
            "errors": stats.errors[:5]}


def measure_policy_call(replicas: int = 64, calls: int = 2000) -> float:
    """Microseconds per QueueDepthPolicy call (the controller runs it every 0.1 s) on a synthetic
    context with `replicas` replicas, each holding a look-back window of 8 samples per metric."""
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
    from ray.serve.config import AutoscalingContext

    from router.autoscaling import QueueDepthPolicy
    dep = DeploymentID(name=REPLICA, app_name=APP)
    ids = [ReplicaID(f"r{i}", dep) for i in range(replicas)]
    raw = {m: {r: [TimeStampedValue(t, 3.0) for t in range(8)] for r in ids}
           for m in ("waiting", "running", "pending_prefill_tokens")}
    policy = QueueDepthPolicy(max_num_seqs=64, downscale_delay_s=1e9)
    state: dict = {}
    t0 = time.perf_counter()
    for i in range(calls):
        ctx = AutoscalingContext(
            deployment_id=dep, deployment_name=REPLICA, app_name=APP, current_num_replicas=replicas,
            target_num_replicas=replicas, running_replicas=ids, total_num_requests=0.0, total_queued_requests=0.0,
            aggregated_metrics=None, raw_metrics=raw, capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=replicas, policy_state=state, last_scale_up_time=None,
            last_scale_down_time=None, current_time=float(i), config=None)
        _, state = policy(ctx)
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from cluster.ports import free_port
    from load_tests.tiny_model import build_tiny_model

    policy_us = measure_policy_call()
    print(f"policy call, 64 replicas: {policy_us:.0f} us", flush=True)
    model_dir = str(build_tiny_model(tempfile.mkdtemp(prefix="llmc-tiny-")))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="llmc-bench",
             runtime_env={"env_vars": TEST_ENV})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "policy_call_us_64_replicas": policy_us,
               "scale_up": [], "replacement": []}
    try:
        for i in range(args.runs):
            r = measure_scale_up(base, model_dir)
            print(f"scale-up run {i}: decision {r['decision_s']:.1f}s, 3 running {r['replicas_running_s']:.1f}s, "
                  f"back to 1 after idle {r['scale_down_after_idle_s']:.1f}s, ok {r['requests_ok']} "
                  f"failed {r['requests_failed']}", flush=True)
            results["scale_up"].append(r)
            r = measure_replacement(base, model_dir)
            print(f"replacement run {i}: stall -> dropped {r['stall_to_dropped_s']:.1f}s, -> replacement serving "
                  f"{r['stall_to_replacement_serving_s']:.1f}s, ok {r['requests_ok']} failed {r['requests_failed']}, "
                  f"max latency {r['max_latency_s']:.1f}s", flush=True)
            results["replacement"].append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
