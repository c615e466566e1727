"""Soak: a local cluster under mixed load for M minutes while its replicas and its Redis are killed.

    python -m load_tests soak --minutes 20 --out reports/soak [--model embedded|tiny|PATH] [--replicas 2]

The cluster is started the way the launcher starts it (`cluster.launcher.running_cluster`: Ray on this
machine, Serve on a free loopback port), with N replicas and an embedded Redis that this module owns, so
it can kill it. Then, for M minutes:
- `concurrency` clients send back-to-back requests: chat and completions, streaming and not, greedy and
  sampled, all with ignore_eos (every answer must have exactly max_tokens tokens). A share of the streams
  is cancelled by the client: it closes the connection after a random number of chunks.
- Every `kill_every_s` the busiest replica's process is SIGKILLed (its streams fail over; Serve starts a
  replacement). The replica's own process, not a Ray call, so it dies as it would on an OOM kill.
- Redis is SIGKILLed once (`redis_kill_at_s`): the routers fall back to load-only routing and requests
  must keep succeeding. It is restarted empty on the same port after `redis_down_s` (what a supervisor
  would do; replicas and routers reconnect by themselves), or never with `redis_down_s` None.
- The RSS of every process of the cluster (this driver, gcs_server, raylet, Ray's agents, the Serve
  controller, proxy, ingress and replicas, redis-server) is sampled every `sample_every_s`.

At the end the load stops, the run waits (bounded) until every replica is idle, and writes into --out:
results.json (verdict and every figure), results.md (summary), soak.png (RSS over time, requests, events),
rss.json (every RSS sample) and requests.jsonl (every request).

What counts as a client-visible error: anything but a complete answer of the right length, except a
cancellation the client made itself. A failover the client never sees is not one. The documented errors
(DOCUMENTED below) are the API's answers when no replica could serve a request; they are counted apart.

RSS flat: every process that lives long enough (`warmup_s` into the run, or `process_warmup_s` after it
started for a process started later, such as a replacement replica, then two windows) must end within
`rss_tolerance` of its level after warm-up (median RSS of its first window after warm-up against the
median of its last window). Ray's idle workers are sampled but not judged: they change role or exit.

KV idle: every replica reports num_running 0, num_waiting 0 and kv_blocks_free == kv_blocks_total. The
engine's free list includes the cached prefix blocks no sequence uses (they stay cached and evictable),
so an idle replica's free blocks equal its total whatever its prefix cache holds.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from load_tests.client import _content, _events
from load_tests.workloads import _words

# Client-visible errors the API documents (router/failover.py, router/admission.py): "<kind>:<code>".
DOCUMENTED = {
    "http_503:no_healthy_replica": "every attempt failed before the first token (no live replica could take it)",
    "stream_error:no_healthy_replica": "a stream cut after some tokens because every failover attempt failed: "
                                       "an error event, then [DONE]",
    "http_429:overloaded": "turned away by admission control or replicas at capacity (Retry-After)",
}

# Roles of the processes sampled; the flat check judges all but these (they change role or come and go).
UNJUDGED_ROLES = {"idle_worker", "other"}
# Each of these must have an RSS series in every soak.
REQUIRED_ROLES = ("driver", "gcs", "raylet", "serve_controller", "proxy", "ingress", "replica", "redis")


class SoakConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    minutes: float = Field(gt=0)
    model: str = "embedded"  # "embedded" (SmolLM2), "tiny" (random weights, built here) or a model directory
    replicas: int = Field(2, ge=2)  # a kill must leave one replica serving
    concurrency: int = Field(4, ge=1)
    min_tokens: int = Field(8, ge=2)
    max_tokens: int = Field(48, ge=2)
    stream_share: float = Field(0.6, ge=0, le=1)
    chat_share: float = Field(0.5, ge=0, le=1)
    cancel_share: float = Field(0.15, ge=0, le=1)  # of the streaming requests
    kill_every_s: float = Field(240, gt=0)
    kill_at_s: list[float] | None = None  # fixed replica kill times (s from load start) instead of kill_every_s
    redis_kill_at_s: float | None = None  # None: 1.5 kill periods in (between the 1st and 2nd kill), at most mid-run
    redis_down_s: float | None = Field(90, ge=0)  # None: Redis stays down to the end
    sample_every_s: float = Field(3, gt=0)
    warmup_s: float | None = None  # None: a quarter of the run, at most 300 s
    process_warmup_s: float = Field(120, ge=0)  # a process started after the run's warm-up gets this long
    rss_window_s: float | None = None  # None: a fifth of the time after warm-up, at most 60 s
    rss_tolerance: float = Field(0.10, gt=0)
    request_timeout_s: float = Field(120, gt=0)
    idle_timeout_s: float = Field(120, gt=0)  # end: how long replicas may take to be idle
    recover_timeout_s: float = Field(240, gt=0)  # a killed replica's replacement must run within this
    seed: int = 0
    progress: bool = True

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    def kill_times(self) -> list[float]:
        if self.kill_at_s is not None:
            return sorted(t for t in self.kill_at_s if t < self.duration_s)
        # The last kill leaves a minute for the replacement to come up and serve before the end.
        n = int((self.duration_s - 60) // self.kill_every_s)
        return [self.kill_every_s * (i + 1) for i in range(max(0, n))]

    def redis_kill_time(self) -> float:
        if self.redis_kill_at_s is not None:
            return self.redis_kill_at_s
        return min(1.5 * self.kill_every_s, self.duration_s / 2)

    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(300.0, self.duration_s / 4)

    def window(self) -> float:
        if self.rss_window_s is not None:
            return self.rss_window_s
        return max(self.sample_every_s * 3, min(60.0, (self.duration_s - self.warmup()) / 5))


# ---------------------------------------------------------------- requests

_SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer briefly and precisely, in plain words.",
    "You are a careful reviewer of code. Point out bugs first, then style, in short sentences.",
    "You translate technical notes into simple English for new team members.",
    "You summarise long reports into three bullet points, keeping every number.",
]


class RequestPlan(BaseModel):
    kind: str  # "chat" | "completion"
    stream: bool
    cancel_after: int | None  # content chunks after which the client closes the connection
    max_tokens: int
    temperature: float
    body: dict


def plan_request(rng: random.Random, nrng: np.random.Generator, cfg: SoakConfig, model: str) -> RequestPlan:
    """One request of the soak's mix. Prompts open with one of a few shared system prompts, so the
    prefix cache and the Redis prefix index have something to find."""
    kind = "chat" if rng.random() < cfg.chat_share else "completion"
    stream = rng.random() < cfg.stream_share
    max_tokens = rng.randint(cfg.min_tokens, cfg.max_tokens)
    cancel_after = rng.randint(1, max_tokens - 1) if stream and rng.random() < cfg.cancel_share else None
    temperature = 0.0 if rng.random() < 0.5 else 0.8
    system = rng.choice(_SYSTEM_PROMPTS)
    user = _words(nrng, rng.randint(8, 60))
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                            "ignore_eos": True, "stream": stream}
    if temperature:
        body["seed"] = rng.randrange(1 << 30)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    else:
        body["prompt"] = f"{system}\n\n{user}"
    return RequestPlan(kind=kind, stream=stream, cancel_after=cancel_after, max_tokens=max_tokens,
                       temperature=temperature, body=body)


class RequestRecord(BaseModel):
    t_s: float  # sent, from load start
    duration_s: float = 0.0
    kind: str
    stream: bool
    planned_cancel: bool
    max_tokens: int
    outcome: str = "ok"  # ok | cancelled | error
    error: str | None = None  # "<kind>[:<code>]"
    detail: str | None = None
    status: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    replica_id: str | None = None

    def fail(self, kind: str, code: str | None = None, detail: str | None = None) -> None:
        if self.outcome != "error":  # the first cause wins
            self.outcome, self.error, self.detail = "error", f"{kind}:{code}" if code else kind, (detail or "")[:300]


def _error_of(payload: Any) -> tuple[str | None, str]:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return err.get("code"), str(err.get("message"))
    return None, str(err if err is not None else payload)[:300]


async def _stream(http: httpx.AsyncClient, url: str, plan: RequestPlan, rec: RequestRecord) -> None:
    async with http.stream("POST", url, json=plan.body) as resp:
        rec.status, rec.replica_id = resp.status_code, resp.headers.get("x-replica-id")
        if resp.status_code != 200:
            raw = await resp.aread()
            try:
                code, msg = _error_of(json.loads(raw))
            except ValueError:
                code, msg = None, raw[:300].decode(errors="replace")
            rec.fail(f"http_{resp.status_code}", code, msg)
            return
        done = False
        async for data in _events(resp.aiter_lines()):
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                rec.fail("bad_event", None, data)
                continue
            if "error" in chunk:
                rec.fail("stream_error", *_error_of(chunk))
                continue
            if _content(chunk):
                rec.chunks += 1
            if chunk.get("usage"):
                rec.completion_tokens = chunk["usage"].get("completion_tokens")
            if plan.cancel_after is not None and rec.chunks >= plan.cancel_after and rec.outcome == "ok":
                # Leaving the `stream` block unread closes the connection: the server sees the client go.
                rec.outcome = "cancelled"
                return
        if not done:
            rec.fail("incomplete", None, "stream ended without [DONE]")
        elif rec.outcome == "ok" and rec.completion_tokens != plan.max_tokens:
            rec.fail("wrong_length", None, f"{rec.completion_tokens} tokens, asked {plan.max_tokens} (ignore_eos)")


async def _plain(http: httpx.AsyncClient, url: str, plan: RequestPlan, rec: RequestRecord) -> None:
    resp = await http.post(url, json=plan.body)
    rec.status, rec.replica_id = resp.status_code, resp.headers.get("x-replica-id")
    try:
        payload = resp.json()
    except ValueError:
        rec.fail("bad_json" if resp.status_code == 200 else f"http_{resp.status_code}", None, resp.text)
        return
    if resp.status_code != 200:
        rec.fail(f"http_{resp.status_code}", *_error_of(payload))
        return
    rec.completion_tokens = (payload.get("usage") or {}).get("completion_tokens")
    if not payload.get("choices"):
        rec.fail("no_choices", None, json.dumps(payload)[:300])
    elif rec.completion_tokens != plan.max_tokens:
        rec.fail("wrong_length", None, f"{rec.completion_tokens} tokens, asked {plan.max_tokens} (ignore_eos)")


async def send(http: httpx.AsyncClient, base: str, plan: RequestPlan, t0: float, timeout_s: float) -> RequestRecord:
    rec = RequestRecord(t_s=time.monotonic() - t0, kind=plan.kind, stream=plan.stream,
                        planned_cancel=plan.cancel_after is not None, max_tokens=plan.max_tokens)
    url = base + ("/v1/chat/completions" if plan.kind == "chat" else "/v1/completions")
    start = time.monotonic()
    try:
        await asyncio.wait_for((_stream if plan.stream else _plain)(http, url, plan, rec), timeout_s)
    except asyncio.TimeoutError:
        rec.fail("timeout", None, f"no complete answer in {timeout_s} s")
    except httpx.HTTPError as e:
        rec.fail(type(e).__name__, None, str(e))
    rec.duration_s = time.monotonic() - start
    return rec


# ---------------------------------------------------------------- processes and RSS


def process_role(cmdline: list[str], name: str, pid: int, driver_pid: int) -> str:
    """What a process of the cluster is, from its command line (Ray titles its workers `ray::<what>`)."""
    if pid == driver_pid:
        return "driver"
    first = cmdline[0] if cmdline else name
    text = " ".join(cmdline) or name
    if "redis-server" in first or name == "redis-server":
        return "redis"
    if "gcs_server" in first:
        return "gcs"
    if first.endswith("raylet") or name == "raylet":
        return "raylet"
    for prefix, role in (("ray::ServeController", "serve_controller"), ("ray::ProxyActor", "proxy"),
                         ("ray::DashboardAgent", "dashboard_agent"), ("ray::RuntimeEnvAgent", "runtime_env_agent"),
                         ("ray::IDLE", "idle_worker")):
        if text.startswith(prefix):
            return role
    if text.startswith("ray::ServeReplica:"):
        # "ray::ServeReplica:<app>:<deployment>", with ".<method>" while it runs one
        deployment = text.split()[0].rsplit(":", 1)[-1].split(".")[0]
        return "replica" if deployment == "LLMReplica" else "ingress" if deployment == "OpenAIIngress" else "other"
    for marker, role in (("dashboard/dashboard.py", "dashboard"), ("log_monitor.py", "log_monitor"),
                         ("autoscaler/_private/monitor.py", "autoscaler_monitor")):
        if marker in text:
            return role
    return "other"


class RSSSampler:
    """In a thread: every `interval_s`, the RSS of this process and all its descendants (Ray's head
    processes and workers, redis-server), each under its role. Bounded by stop() and `max_samples`."""

    def __init__(self, interval_s: float, t0: float, max_samples: int):
        import psutil
        self.psutil = psutil
        self.interval_s, self.t0, self.max_samples = interval_s, t0, max_samples
        self.me = psutil.Process()
        self.procs: dict[int, dict] = {}  # pid -> {"role", "name", "t": [...], "rss": [...]}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def start(self) -> "RSSSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set() and self.samples < self.max_samples:
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 2)
        try:
            procs = [self.me] + self.me.children(recursive=True)
        except self.psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    rss, cmd, name = p.memory_info().rss, p.cmdline(), p.name()
            except self.psutil.Error:  # gone between listing and reading
                continue
            role = process_role(cmd, name, p.pid, self.me.pid)
            entry = self.procs.setdefault(p.pid, {"role": role, "name": name, "t": [], "rss": []})
            if role != "idle_worker":  # an idle worker that takes an actor keeps the actor's role
                entry["role"] = role
            entry["t"].append(t)
            entry["rss"].append(rss)
        self.samples += 1


def rss_flat_check(procs: dict[int, dict], *, warmup_s: float, process_warmup_s: float, window_s: float,
                   tolerance: float, end_s: float, interval_s: float) -> dict:
    """Per process: its level after warm-up against its last window (medians), and whether it is judged.
    A process is judged when it outlived its warm-up by two windows and its role is not UNJUDGED_ROLES."""
    rows = []
    for pid, p in sorted(procs.items(), key=lambda kv: (kv[1]["role"], kv[1]["t"][0] if kv[1]["t"] else 0)):
        t, rss = p["t"], p["rss"]
        if not t:
            continue
        first, last = t[0], t[-1]
        # Present from the first sample: the run's warm-up; started later (a replacement): its own too.
        start = warmup_s if first <= 1.5 * interval_s else max(warmup_s, first + process_warmup_s)
        base = [r for x, r in zip(t, rss) if start <= x <= start + window_s]
        tail = [r for x, r in zip(t, rss) if x >= last - window_s]
        judged = p["role"] not in UNJUDGED_ROLES and last - start >= 2 * window_s and len(base) >= 2
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        row = {"pid": pid, "role": p["role"], "first_s": first, "last_s": last,
               "alive_at_end": last >= end_s - 3 * interval_s,
               "start_mib": mib(rss[0]), "max_mib": mib(max(rss)), "judged": judged}
        if judged:
            b, e = statistics.median(base), statistics.median(tail)
            row.update(after_warmup_mib=mib(b), last_window_mib=mib(e), change=round(e / b - 1, 4),
                       flat=abs(e / b - 1) <= tolerance)
        else:
            row["why_not_judged"] = ("role not judged" if p["role"] in UNJUDGED_ROLES
                                     else "did not outlive its warm-up by two windows")
        rows.append(row)
    judged = [r for r in rows if r["judged"]]
    return {"warmup_s": warmup_s, "process_warmup_s": process_warmup_s, "window_s": window_s,
            "tolerance": tolerance, "processes": rows, "judged": len(judged),
            "flat": bool(judged) and all(r["flat"] for r in judged),
            "not_flat": [f"{r['role']} {r['pid']}: {r['change']:+.1%}" for r in judged if not r["flat"]]}


# ---------------------------------------------------------------- cluster probes


def _replica_stats(handle, timeout_s: float = 5.0) -> dict[str, dict]:
    from load_tests.bench_routing import replica_stats
    try:
        return replica_stats(handle, timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - a replica dying under the broadcast: no answer this time
        return {}


def _replica_states(app: str) -> dict[str, int]:
    from load_tests.bench_autoscaling import replica_states
    try:
        return replica_states(app)
    except Exception:  # noqa: BLE001 - the controller busy replacing a replica
        return {}


def _metric_lines(text: str, prefix: str = "llmc_") -> dict[str, float]:
    """Counter and gauge samples of a Prometheus text page (histogram buckets left out)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "_bucket{" not in line and "_created{" not in line:
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _router_metrics(base: str) -> dict[str, float]:
    try:
        return _metric_lines(httpx.get(base + "/metrics", timeout=5).text)
    except httpx.HTTPError:
        return {}


def _ray_metrics_port() -> int | None:
    import ray
    with contextlib.suppress(Exception):
        return int(ray._private.worker.global_worker.node.metrics_export_port)
    return None


def _ray_routing(port: int | None) -> dict[str, dict[str, float]]:
    """The request routers' and publishers' counters from Ray's metrics export (what they record goes
    there, not to the ingress's /metrics): routing outcomes and Redis fallbacks."""
    if port is None:
        return {}
    from load_tests.bench_routing import ray_metrics
    return {"routing": ray_metrics(port, "llmc_routing_decisions_total", "outcome"),
            "redis_fallbacks": ray_metrics(port, "llmc_redis_fallbacks_total", "component")}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v - before.get(k, 0.0)}


# ---------------------------------------------------------------- the run


def _cluster_config(cfg: SoakConfig, scratch: Path):
    from cluster.config import load_config
    from cluster.ports import free_port
    over: dict[str, Any] = {"engine.device": "cpu", "replicas.num_replicas": cfg.replicas,
                            "router.port": free_port(), "router.policy": "prefix",
                            # A killed replica is noticed by its streams and Ray at once; health checks
                            # only catch hung ones, and the end of the run should not wait on drains.
                            "replicas.graceful_shutdown_timeout_s": 5}
    if cfg.model == "tiny":
        from load_tests.tiny_model import build_tiny_model
        over.update({"engine.model": str(build_tiny_model(scratch / "tiny")), "engine.model_id": "tiny",
                     "engine.num_kv_blocks": 512, "engine.max_model_len": 512, "replicas.num_cpus": 0.5})
    elif cfg.model != "embedded":
        over["engine.model"] = cfg.model
    return load_config(env={}, overrides=over)


def run_soak(cfg: SoakConfig, out_dir: str | Path, *, command: str | None = None) -> dict:
    """Start the cluster, soak it, write the report into out_dir; returns results.json's content."""
    from cluster.launcher import running_cluster
    from cluster.redis_server import EmbeddedRedis
    from load_tests.bench_autoscaling import wait_for, wait_ready
    from load_tests.standard import machine_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmc-soak-")))
        cluster_cfg = _cluster_config(cfg, scratch)
        # Our own Redis, handed to the launcher as REDIS_URL would be, so that the soak can kill it.
        redis = stack.enter_context(EmbeddedRedis())
        cluster_cfg = cluster_cfg.model_copy(update={"redis_url": redis.url})
        t_start = time.monotonic()
        live = stack.enter_context(running_cluster(cluster_cfg, dashboard=False, log_to_driver=False))
        base = f"http://127.0.0.1:{live.router.port}"
        wait_ready(base, 600)
        wait_for(lambda: _replica_states(live.app_name).get("RUNNING", 0) == cfg.replicas, 600, 1.0,
                 what=f"{cfg.replicas} replicas")
        startup_s = time.monotonic() - t_start
        _say(cfg, f"cluster up in {startup_s:.0f} s on {base} ({cfg.replicas} replicas of {cfg.model}, "
                  f"Redis {redis.url})")
        soak = _Soak(cfg, base, live, redis)
        raw = asyncio.run(soak.run())
        t_stop = time.monotonic()
    _say(cfg, f"cluster stopped in {time.monotonic() - t_stop:.0f} s")
    results = _results(cfg, raw, machine=machine, command=command, startup_s=startup_s, load_start=load_start)
    write_report(results, raw, out)
    return results


def _say(cfg: SoakConfig, text: str) -> None:
    if cfg.progress:
        print(f"[soak] {text}", file=sys.stderr, flush=True)


class _Soak:
    def __init__(self, cfg: SoakConfig, base: str, live, redis):
        from ray import serve

        from cluster.app import REPLICA_DEPLOYMENT
        self.cfg, self.base, self.live, self.redis = cfg, base, live, redis
        self.app = live.app_name
        self.model = live.engine.served_model_id
        self.handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, live.app_name)
        self.records: list[RequestRecord] = []
        self.events: list[dict] = []
        self.status: list[dict] = []  # replicas RUNNING and engine load over time
        self.ray_counters: list[dict] = []  # (t, routing outcomes, Redis fallbacks) over time
        self.rng = random.Random(cfg.seed)
        self.metrics_port = _ray_metrics_port()

    def t(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    async def run(self) -> dict:
        cfg = self.cfg
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + cfg.duration_s
        bound = int(2 * (cfg.duration_s + cfg.idle_timeout_s + cfg.request_timeout_s + 120) / cfg.sample_every_s)
        rss = RSSSampler(cfg.sample_every_s, self.t0, max_samples=bound).start()
        router_before = await asyncio.to_thread(_router_metrics, self.base)
        ray_before = await asyncio.to_thread(_ray_routing, self.metrics_port)
        recoveries: list[asyncio.Task] = []
        done = asyncio.Event()
        sampler: asyncio.Task | None = None
        try:
            timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
            limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
            async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
                sampler = asyncio.create_task(self._sample_status(done))
                chaos = asyncio.create_task(self._chaos(recoveries))
                await asyncio.gather(*(self._worker(http, i) for i in range(cfg.concurrency)))
            self.load_end_s = self.t()
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            if recoveries:
                await asyncio.wait(recoveries, timeout=cfg.recover_timeout_s)
            kv = await asyncio.to_thread(self._wait_idle)
            _say(cfg, f"end: {'idle' if kv['idle'] else 'NOT idle'} after {kv['waited_s']:.0f} s")
            await asyncio.sleep(12)  # one Ray metrics report period, so the counters include the end
            router_after = await asyncio.to_thread(_router_metrics, self.base)
            ray_after = await asyncio.to_thread(_ray_routing, self.metrics_port)
        finally:
            done.set()
            for task in recoveries:
                task.cancel()
            rss.stop()
        if sampler is not None:
            await sampler
        return {"served_model": self.model, "t_end_s": self.t(), "load_end_s": self.load_end_s,
                "records": self.records, "events": self.events,
                "status": self.status, "ray_counters": self.ray_counters, "kv_end": kv,
                "rss": rss.procs, "rss_samples": rss.samples,
                "router_metrics": _delta(router_after, router_before),
                "ray_metrics": {k: _delta(ray_after.get(k, {}), ray_before.get(k, {})) for k in ray_after}}

    async def _worker(self, http: httpx.AsyncClient, i: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-{i}")
        nrng = np.random.default_rng([cfg.seed, i])
        limit = int(cfg.duration_s * 50) + 100  # requests per worker, far above what a run can send
        for _ in range(limit):
            if time.monotonic() >= self.stop_at:
                return
            plan = plan_request(rng, nrng, cfg, self.model)
            rec = await send(http, self.base, plan, self.t0, cfg.request_timeout_s)
            self.records.append(rec)
            if rec.outcome == "error":
                _say(cfg, f"t={rec.t_s:.0f}s client error {rec.error}: {rec.detail}")
                await asyncio.sleep(0.2)  # a failing cluster is not hammered in a tight loop

    def schedule(self) -> list[tuple[float, str]]:
        cfg = self.cfg
        plan = [(t, "kill_replica") for t in cfg.kill_times()]
        red = cfg.redis_kill_time()
        if red < cfg.duration_s:
            plan.append((red, "kill_redis"))
            if cfg.redis_down_s is not None:
                plan.append((red + cfg.redis_down_s, "restart_redis"))
        return sorted(plan)

    async def _chaos(self, recoveries: list[asyncio.Task]) -> None:
        for at, what in self.schedule():
            wait = self.t0 + at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if what == "kill_replica":
                event, before = await asyncio.to_thread(self._kill_replica)
                if event.get("pid"):
                    recoveries.append(asyncio.create_task(self._recovery(event, before)))
            elif what == "kill_redis":
                pid = self.redis.pid
                self.redis.stop(graceful=False)  # SIGKILL, as a crash
                event = {"t_s": self.t(), "event": "kill_redis", "pid": pid}
            else:
                await asyncio.to_thread(self.redis.restart)
                event = {"t_s": self.t(), "event": "restart_redis", "pid": self.redis.pid}
            self.events.append(event)
            _say(self.cfg, f"t={event['t_s']:.0f}s {event}")

    def _kill_replica(self) -> tuple[dict, set[str]]:
        """SIGKILL the busiest replica's process; the event and the replica ids there were."""
        stats = _replica_stats(self.handle)
        if not stats:
            return {"t_s": self.t(), "event": "kill_replica", "error": "no replica answered the stats call"}, set()
        # The busiest replica: the kill then cuts the most streams, each of which must fail over.
        victim = max(stats.values(), key=lambda s: (s["num_running"] + s["num_waiting"], self.rng.random()))
        os.kill(victim["pid"], signal.SIGKILL)
        return {"t_s": self.t(), "event": "kill_replica", "pid": victim["pid"], "replica_id": victim["replica_id"],
                "running": victim["num_running"], "waiting": victim["num_waiting"]}, set(stats)

    async def _recovery(self, event: dict, before: set[str]) -> None:
        """When the killed replica's replacement is RUNNING and answers (`replacement_s` on the event)."""
        deadline = time.monotonic() + self.cfg.recover_timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            states = await asyncio.to_thread(_replica_states, self.app)
            if states.get("RUNNING", 0) != self.cfg.replicas:
                continue
            stats = await asyncio.to_thread(_replica_stats, self.handle, 3.0)
            new = [s for rid, s in stats.items() if rid not in before]
            if len(stats) == self.cfg.replicas and new:
                event["replacement_s"] = round(self.t() - event["t_s"], 1)
                event["replacement_pid"] = new[0]["pid"]
                _say(self.cfg, f"t={self.t():.0f}s replica {event['pid']} replaced after {event['replacement_s']} s")
                return

    async def _sample_status(self, done: asyncio.Event) -> None:
        last_line = last_counters = -1e9
        bound = int(3 * (self.cfg.duration_s + self.cfg.idle_timeout_s + 300) / self.cfg.sample_every_s)
        for _ in range(bound):
            if done.is_set():
                return
            states = await asyncio.to_thread(_replica_states, self.app)
            stats = await asyncio.to_thread(_replica_stats, self.handle, 2.0)
            def total(key: str, stats: dict = stats) -> int:
                return sum(s[key] for s in stats.values())
            self.status.append({"t_s": self.t(), "running_replicas": states.get("RUNNING", 0),
                                "answering": len(stats), "num_running": total("num_running"),
                                "num_waiting": total("num_waiting"),
                                "kv_used_blocks": total("kv_blocks_total") - total("kv_blocks_free")})
            if self.t() - last_counters >= 10:
                last_counters = self.t()
                counters = await asyncio.to_thread(_ray_routing, self.metrics_port)
                self.ray_counters.append({"t_s": last_counters, **counters})
            if self.t() - last_line >= 60:
                last_line = self.t()
                n = len(self.records)
                errors = sum(1 for r in self.records if r.outcome == "error")
                _say(self.cfg, f"t={last_line:.0f}s requests {n}, errors {errors}, replicas {states}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), self.cfg.sample_every_s)

    def _wait_idle(self) -> dict:
        """Bounded wait until every replica is idle with all its KV blocks free; the last stats either way."""
        t = time.monotonic()
        deadline = t + self.cfg.idle_timeout_s
        stats: dict[str, dict] = {}
        while True:
            stats = _replica_stats(self.handle)
            idle = len(stats) == self.cfg.replicas and all(
                s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
                for s in stats.values())
            if idle or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        keep = ("pid", "num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "kv_usage",
                "prefix_query_tokens", "prefix_hit_tokens", "num_preemptions")
        return {"idle": idle, "waited_s": round(time.monotonic() - t, 1),
                "replicas": {rid: {k: s.get(k) for k in keep} for rid, s in stats.items()}}


# ---------------------------------------------------------------- results


def error_counts(records: Iterable[RequestRecord]) -> dict:
    errors: dict[str, int] = {}
    for r in records:
        if r.outcome == "error":
            errors[r.error] = errors.get(r.error, 0) + 1
    documented = {k: v for k, v in errors.items() if k in DOCUMENTED}
    return {"all": errors, "documented": documented,
            "undocumented": {k: v for k, v in errors.items() if k not in DOCUMENTED}}


def _by_mix(records: list[RequestRecord]) -> dict:
    out: dict[str, dict] = {}
    for r in records:
        row = out.setdefault(f"{r.kind}{' stream' if r.stream else ''}",
                             {"sent": 0, "ok": 0, "cancelled": 0, "error": 0})
        row["sent"] += 1
        row[r.outcome] += 1
    return out


def _window(records: list[RequestRecord], start: float, end: float) -> dict:
    rs = [r for r in records if start <= r.t_s < end]
    return {"from_s": round(start, 1), "to_s": round(end, 1), "sent": len(rs), "ok": sum(r.outcome == "ok" for r in rs),
            "cancelled_by_client": sum(r.outcome == "cancelled" for r in rs), "errors": error_counts(rs)["all"]}


def _counter_phase(samples: list[dict], start: float, end: float, key: str) -> dict[str, float]:
    """A counter family's increase between the samples nearest start and end (10 s resolution)."""
    if not samples:
        return {}
    a = min(samples, key=lambda s: abs(s["t_s"] - start))
    b = min(samples, key=lambda s: abs(s["t_s"] - end))
    return _delta(b.get(key, {}), a.get(key, {}))


def _results(cfg: SoakConfig, raw: dict, *, machine: dict, command: str | None, startup_s: float,
             load_start) -> dict:
    records: list[RequestRecord] = raw["records"]
    errors = error_counts(records)
    events = raw["events"]
    kills = [e for e in events if e["event"] == "kill_replica"]
    warmup = cfg.warmup()
    rss = rss_flat_check(raw["rss"], warmup_s=warmup, process_warmup_s=cfg.process_warmup_s,
                         window_s=cfg.window(), tolerance=cfg.rss_tolerance, end_s=raw["t_end_s"],
                         interval_s=cfg.sample_every_s)
    roles: dict[str, int] = {}
    for p in raw["rss"].values():
        roles[p["role"]] = roles.get(p["role"], 0) + 1
    redis_kill = next((e for e in events if e["event"] == "kill_redis"), None)
    redis_back = next((e for e in events if e["event"] == "restart_redis"), None)
    redis = None
    if redis_kill:
        down_end = redis_back["t_s"] if redis_back else raw["load_end_s"]
        after = [s for s in raw["ray_counters"] if s["t_s"] >= redis_kill["t_s"]]
        redis = {"killed_at_s": redis_kill["t_s"], "restarted_at_s": redis_back["t_s"] if redis_back else None,
                 "while_down": _window(records, redis_kill["t_s"], down_end),
                 # Ray exports these counters every ~10 s: the phases are read at that resolution.
                 "routing_while_down": _counter_phase(raw["ray_counters"], redis_kill["t_s"], down_end + 10, "routing"),
                 "routing_before": _counter_phase(raw["ray_counters"], 0, redis_kill["t_s"], "routing"),
                 "routing_after_restart": (_counter_phase(after, down_end + 10, raw["t_end_s"], "routing")
                                           if redis_back else None),
                 "fallbacks_while_down": _counter_phase(raw["ray_counters"], redis_kill["t_s"], down_end + 10,
                                                        "redis_fallbacks")}
    kv = raw["kv_end"]
    kills_recovered = all("replacement_s" in k for k in kills) and all(k.get("pid") for k in kills)
    verdict = {"no_undocumented_errors": not errors["undocumented"], "rss_flat": rss["flat"], "kv_idle": kv["idle"],
               "replica_kills_recovered": kills_recovered,
               "every_process_sampled": all(roles.get(r) for r in REQUIRED_ROLES)}
    verdict["passed"] = all(verdict.values())
    ok = sum(r.outcome == "ok" for r in records)
    return {
        "kind": "soak", "verdict": verdict, "command": command, "machine": machine,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "config": cfg.model_dump(mode="json"), "served_model": raw["served_model"],
        "schedule": {"replica_kills_s": cfg.kill_times(), "redis_kill_s": cfg.redis_kill_time(),
                     "redis_down_s": cfg.redis_down_s},
        "startup_s": round(startup_s, 1), "load_s": raw["load_end_s"], "run_s": raw["t_end_s"],
        "requests": {"sent": len(records), "ok": ok,
                     "cancelled_by_client": sum(r.outcome == "cancelled" for r in records),
                     "errors": errors["all"], "documented_errors": errors["documented"],
                     "undocumented_errors": errors["undocumented"],
                     "ok_per_s": round(ok / raw["load_end_s"], 3) if raw["load_end_s"] else None,
                     "output_tokens": sum(r.completion_tokens or 0 for r in records if r.outcome == "ok"),
                     "by_mix": _by_mix(records),
                     "error_examples": {k: next(r.detail for r in records if r.error == k) for k in errors["all"]}},
        "documented_error_kinds": DOCUMENTED,
        "replica_kills": kills, "redis": redis, "events": events,
        "router_metrics_delta": raw["router_metrics"], "ray_metrics_delta": raw["ray_metrics"],
        "kv_end": kv, "rss": rss, "processes_by_role": roles, "rss_samples": raw["rss_samples"],
    }


# ---------------------------------------------------------------- report


def plot_soak(results: dict, raw: dict, path: Path) -> str:
    """RSS over time (cluster processes; replicas), requests per interval and replicas running, with the
    kills marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from load_tests.report import _save
    fig = Figure(figsize=(11, 10), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    mib = 2 ** 20
    for pid, p in sorted(raw["rss"].items(), key=lambda kv: kv[1]["role"]):
        if p["role"] in ("idle_worker",) or len(p["t"]) < 2:
            continue
        ax = ax2 if p["role"] == "replica" else ax1
        ax.plot(p["t"], [r / mib for r in p["rss"]], lw=1.2, label=f"{p['role']} {pid}")
    ax1.set_title("RSS of the cluster's processes (Ray idle workers left out)")
    ax2.set_title("RSS of the replicas (a killed replica's line ends; its replacement starts a new one)")
    for ax in (ax1, ax2):
        ax.set_ylabel("RSS (MiB)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    records: list[RequestRecord] = raw["records"]
    end = raw["load_end_s"] or 1
    step = max(10.0, end / 60)
    bins = int(end // step) + 1
    counts = {k: [0] * bins for k in ("ok", "cancelled", "error")}
    for r in records:
        counts[r.outcome][min(bins - 1, int(r.t_s // step))] += 1
    xs = [i * step for i in range(bins)]
    bottom = [0] * bins
    for k, color in (("ok", "tab:green"), ("cancelled", "tab:gray"), ("error", "tab:red")):
        ax3.bar(xs, counts[k], width=step * 0.9, align="edge", bottom=bottom, color=color, label=k)
        bottom = [a + b for a, b in zip(bottom, counts[k])]
    ax3.set_ylabel(f"requests sent per {step:.0f} s")
    ax3.set_xlabel("time since load start (s)")
    ax3b = ax3.twinx()
    st = raw["status"]
    ax3b.step([s["t_s"] for s in st], [s["running_replicas"] for s in st], where="post", color="black", lw=1,
              label="replicas RUNNING")
    ax3b.set_ylabel("replicas RUNNING")
    ax3b.set_ylim(0, results["config"]["replicas"] + 1)
    ax3.set_title("Requests by outcome and replicas running")
    ax3.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.06, 0.5))
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.axvspan(0, results["rss"]["warmup_s"], color="gray", alpha=0.08)
        for e in results["events"]:
            style = {"kill_replica": ("tab:red", "--"), "kill_redis": ("tab:purple", "-"),
                     "restart_redis": ("tab:purple", ":")}[e["event"]]
            ax.axvline(e["t_s"], color=style[0], ls=style[1], lw=1)
    v = results["verdict"]
    fig.suptitle(f"soak {results['load_s'] / 60:.0f} min, {results['config']['replicas']} replicas of "
                 f"{results['served_model']}: red dashed = replica SIGKILL, purple = Redis SIGKILL / restart "
                 f"(dotted), shaded = warm-up; {'passed' if v['passed'] else 'FAILED'}", fontsize=10)
    return _save(fig, path)


def summary_markdown(results: dict) -> str:
    r, v, kv, rss = results["requests"], results["verdict"], results["kv_end"], results["rss"]
    mark = lambda ok: "yes" if ok else "**NO**"  # noqa: E731
    lines = [f"# soak: {results['load_s'] / 60:.1f} min, {results['config']['replicas']} replicas of "
             f"{results['served_model']}", "",
             f"- machine: {results['machine'].get('machine')}; commit {results['machine'].get('commit')}; "
             f"{results['machine'].get('date')}",
             f"- command: `{results['command']}`" if results.get("command") else "",
             f"- load average (1/5/15 min) at start {results['load_average_start']}, end "
             f"{tuple(round(x, 1) for x in results['load_average_end'])}", "",
             "| check | result |", "|---|---|",
             f"| no client errors beyond the documented ones | {mark(v['no_undocumented_errors'])}: "
             f"{sum(r['undocumented_errors'].values())} undocumented "
             f"{r['undocumented_errors'] or ''}, {sum(r['documented_errors'].values())} documented "
             f"{r['documented_errors'] or ''} |",
             f"| RSS flat within {rss['tolerance']:.0%} after warm-up | {mark(v['rss_flat'])}: "
             f"{rss['judged']} processes judged"
             f"{'; not flat: ' + ', '.join(rss['not_flat']) if rss['not_flat'] else ''} |",
             f"| KV blocks back to idle | {mark(v['kv_idle'])}: "
             + ", ".join(f"{s['kv_blocks_free']}/{s['kv_blocks_total']} free, {s['num_running']} running"
                         for s in kv["replicas"].values()) + f" (waited {kv['waited_s']} s) |",
             f"| every replica kill replaced | {mark(v['replica_kills_recovered'])}: "
             + ", ".join(f"{k['t_s']:.0f} s → replaced after {k.get('replacement_s', '–')} s"
                         for k in results["replica_kills"]) + " |",
             f"| RSS series of every process kind | {mark(v['every_process_sampled'])}: "
             f"{results['processes_by_role']} |", "",
             f"Requests: {r['sent']} sent, {r['ok']} ok, {r['cancelled_by_client']} cancelled by the client "
             f"(connection closed mid-stream), errors {r['errors'] or 0}; {r['ok_per_s']} ok/s, "
             f"{r['output_tokens']} output tokens. Mix: "
             + ", ".join(f"{k} {x['sent']}" for k, x in r["by_mix"].items()) + "."]
    if results["redis"]:
        red, down = results["redis"], results["redis"]["while_down"]
        lines.append(f"\nRedis SIGKILLed at {red['killed_at_s']:.0f} s, "
                     + (f"restarted at {red['restarted_at_s']:.0f} s" if red["restarted_at_s"] else "not restarted")
                     + f": of the {down['sent']} requests sent while it was down, {down['ok']} ok, "
                     f"{down['cancelled_by_client']} cancelled by the client, errors {down['errors'] or 0}; routing "
                     f"decisions while down {red['routing_while_down'] or '–'}, Redis fallbacks "
                     f"{red['fallbacks_while_down'] or '–'}.")
    fo = {k: v for k, v in results["router_metrics_delta"].items() if "failovers" in k or "retries" in k}
    if fo:
        lines.append(f"\nRouter failovers and retries (/metrics): {fo}")
    lines += ["", "RSS by process (MiB): after warm-up → last window (change)", "",
              "| process | first seen s | after warm-up | last window | change | max |", "|---|---|---|---|---|---|"]
    for p in rss["processes"]:
        if p["judged"]:
            lines.append(f"| {p['role']} {p['pid']} | {p['first_s']:.0f} | {p['after_warmup_mib']} | "
                         f"{p['last_window_mib']} | {p['change']:+.1%} | {p['max_mib']} |")
        elif p["role"] not in UNJUDGED_ROLES:
            lines.append(f"| {p['role']} {p['pid']} | {p['first_s']:.0f} | – | – | not judged: "
                         f"{p['why_not_judged']} | {p['max_mib']} |")
    lines += ["", "Documented errors (not counted as failures): "
              + "; ".join(f"`{k}`: {d}" for k, d in results["documented_error_kinds"].items()), "",
              "![soak](soak.png)", ""]
    return "\n".join(x for x in lines if x is not None) + "\n"


def write_report(results: dict, raw: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_soak(results, raw, out / "soak.png")
    results["plot"] = "soak.png"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "rss.json").write_text(json.dumps(
        {"warmup_s": results["rss"]["warmup_s"], "interval_s": results["config"]["sample_every_s"],
         "processes": {str(pid): {"role": p["role"], "name": p["name"], "t_s": p["t"],
                                  "rss_mib": [round(x / 2**20, 1) for x in p["rss"]]}
                       for pid, p in raw["rss"].items()}}))
    with open(out / "requests.jsonl", "w") as f:
        for r in raw["records"]:
            f.write(r.model_dump_json(exclude_none=True) + "\n")
    (out / "results.md").write_text(summary_markdown(results))


# ---------------------------------------------------------------- command line


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def add_arguments(p) -> None:
    d = SoakConfig(minutes=1)
    p.add_argument("--minutes", type=float, required=True, help="load duration")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--model", default=d.model, help="embedded (SmolLM2, default), tiny (random weights) or a path")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="clients sending back to back")
    p.add_argument("--kill-every-s", type=float, default=d.kill_every_s, help="SIGKILL the busiest replica this often")
    p.add_argument("--kill-at", type=_floats, help="fixed replica kill times (s from load start), comma-separated")
    p.add_argument("--redis-kill-at", type=float, help="Redis SIGKILL time (default 1.5 kill periods, at most mid-run)")
    p.add_argument("--redis-down-s", type=float, default=d.redis_down_s, help="restart Redis after this long")
    p.add_argument("--no-redis-restart", action="store_true", help="Redis stays down to the end")
    p.add_argument("--cancel-share", type=float, default=d.cancel_share, help="streams the client cancels")
    p.add_argument("--sample-every-s", type=float, default=d.sample_every_s, help="RSS sampling period")
    p.add_argument("--warmup-s", type=float, help="RSS warm-up (default a quarter of the run, at most 300 s)")
    p.add_argument("--rss-window-s", type=float, help="RSS comparison window (default a fifth after warm-up, <= 60 s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a) -> SoakConfig:
    return SoakConfig(minutes=a.minutes, model=a.model, replicas=a.replicas, concurrency=a.concurrency,
                      kill_every_s=a.kill_every_s, kill_at_s=a.kill_at, redis_kill_at_s=a.redis_kill_at,
                      redis_down_s=None if a.no_redis_restart else a.redis_down_s, cancel_share=a.cancel_share,
                      sample_every_s=a.sample_every_s, warmup_s=a.warmup_s, rss_window_s=a.rss_window_s,
                      seed=a.seed, progress=not a.no_progress)


def main_soak(a, argv: list[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = config_from_args(a)
    command = "python -m load_tests " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_soak(cfg, a.out, command=command)
    print((Path(a.out) / "results.md").read_text(), end="")
    return 0 if results["verdict"]["passed"] else 1
