"""`llm-cluster status`: one snapshot of a running cluster (Serve application and deployments, each
replica's health and engine stats, Redis reachability and how the request routers fare with it, the
autoscaler's target) as a dict, and a fixed-width table of it for people.

Sources: `serve.status()` (deployment health and replica states), the Serve controller's instance
details (per-replica node/pid/state, target replica counts, autoscaling decisions: the same data the
dashboard's Serve page shows), `stats()` broadcast to every LLMReplica replica, `redis_routing()`
broadcast to every ingress replica (its request routers' index lookup failures, Redis fallbacks and
breaker state, totals since the replica started), and a Redis PING.
Every part degrades on its own: a replica that does not answer is listed with its error, and the
rest of the report still comes back.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cluster.app import INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT, config_from_args
from replicas.protocol import ReplicaStats
from router.replica_choice import RedisRoutingStats


def collect_status(address: str = "auto", app_name: str = "llm-cluster", redis_url: str | None = None,
                   timeout_s: float = 10.0) -> dict[str, Any]:
    """Connect to the cluster at `address` (or use this process's Ray connection) and snapshot it."""
    import ray

    report: dict[str, Any] = {"app": app_name, "collected_at": _dt.datetime.now().isoformat(timespec="seconds")}
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            _use_ray_token_if_present()
            try:
                ray.init(address=address, namespace="serve", log_to_driver=False, logging_level="ERROR")
            except Exception as e:  # no cluster there
                report["error"] = f"cannot connect to Ray at {address!r}: {e}"
                return report
            stack.callback(ray.shutdown)
        _collect(report, app_name, redis_url, timeout_s)
    return report


def _use_ray_token_if_present() -> None:
    """A local node started by `llm-cluster serve` requires Ray's auth token (Ray 2.60 enables token auth for
    new local clusters and saves the token in ~/.ray), but `ray.init(address=...)` of another process does
    not turn token auth on by itself: without this, status could not attach to the launcher's node."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _collect(report: dict[str, Any], app_name: str, redis_url: str | None, timeout_s: float) -> None:
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception as e:
        report["error"] = f"Serve is not running: {e}"
        return
    if app is None:
        report["error"] = f"no Serve application named {app_name!r}"
        return
    report.update(status=str(app.status.value), message=app.message)
    details = _app_details(app_name)
    deployments: dict[str, Any] = {}
    for name, d in app.deployments.items():
        det = (details.get("deployments") or {}).get(name, {})
        states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
        deployments[name] = {
            "status": str(d.status.value), "message": d.message, "replica_states": states,
            "running_replicas": states.get("RUNNING", 0), "target_replicas": det.get("target_num_replicas"),
        }
    report["deployments"] = deployments

    replica_details = (details.get("deployments") or {}).get(REPLICA_DEPLOYMENT, {})
    stats, errors = _replica_stats(app_name, timeout_s)
    report["replicas"] = _merge_replicas(replica_details.get("replicas") or [], stats, errors)
    report["autoscaler"] = _autoscaler(replica_details, deployments.get(REPLICA_DEPLOYMENT, {}))

    url = redis_url or os.environ.get("REDIS_URL") or _redis_url_from_app(details, app_name, timeout_s)
    report["redis"] = check_redis(url) if url else {
        "url": None, "reachable": None, "error": "redis_url unknown: pass --redis-url"}
    report["redis_routing"] = _redis_routing(app_name, timeout_s)


def _redis_routing(app_name: str, timeout_s: float) -> dict[str, Any]:
    from ray import serve

    try:
        handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name)
        results = handle.broadcast("redis_routing").results(timeout_s=timeout_s, return_exceptions=True)
    except Exception as e:
        return summarize_redis_routing([], [f"{type(e).__name__}: {e}"])
    return summarize_redis_routing([r for r in results if not isinstance(r, BaseException)],
                                   [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)])


_BREAKER_ORDER = ("closed", "half_open", "open")


def summarize_redis_routing(stats: list, errors: list[str]) -> dict[str, Any]:
    """The ingress replicas' `RedisRoutingStats` -> the report's `redis_routing`: each replica's record,
    and over all of them the most open breaker, the breaker states counted, and the totals by reason."""
    routers = [RedisRoutingStats.model_validate(s).model_dump() for s in stats]
    failures: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    states: dict[str, int] = {}
    for r in routers:
        for totals, into in ((r["lookup_failures"], failures), (r["fallbacks"], fallbacks)):
            for reason, n in totals.items():
                into[reason] = into.get(reason, 0) + n
        if r["breaker"] is not None:
            states[r["breaker"]] = states.get(r["breaker"], 0) + 1
    return {"routers": routers, "errors": errors,
            "breaker": max(states, key=_BREAKER_ORDER.index, default=None), "breaker_states": states,
            "lookup_failures": failures, "fallbacks": fallbacks}


def _app_details(app_name: str) -> dict[str, Any]:
    """The controller's instance details for one app (what the dashboard's Serve page shows);
    {} where this Ray version does not give them."""
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
    except Exception:
        return {}
    return (details.get("applications") or {}).get(app_name) or {}


def _replica_stats(app_name: str, timeout_s: float) -> tuple[list[ReplicaStats], list[str]]:
    from ray import serve

    try:
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name)
        results = handle.broadcast("stats").results(timeout_s=timeout_s, return_exceptions=True)
    except Exception as e:
        return [], [f"{type(e).__name__}: {e}"]
    stats = [r for r in results if isinstance(r, ReplicaStats)]
    errors = [f"{type(r).__name__}: {r}" for r in results if not isinstance(r, ReplicaStats)]
    return stats, errors


def _merge_replicas(details: list[dict], stats: list[ReplicaStats], errors: list[str]) -> list[dict]:
    by_id = {s.replica_id: s for s in stats}
    rows = []
    for d in details:
        rid = d.get("replica_id")
        row = {"replica_id": rid, "state": str(_enum_value(d.get("state"))), "node_id": d.get("node_id"),
               "node_ip": d.get("node_ip"), "pid": d.get("pid"), "actor_name": d.get("actor_name")}
        s = by_id.pop(rid, None)
        row.update(_health(row["state"], s))
        rows.append(row)
    for rid, s in by_id.items():  # no controller details: stats alone
        row = {"replica_id": rid, "state": "RUNNING", "node_id": s.node_id, "node_ip": None,
               "pid": s.pid, "actor_name": None}
        row.update(_health("RUNNING", s))
        rows.append(row)
    # Errors cannot be tied to a replica (the broadcast does not say which one failed): attach them
    # to the running replicas that gave no stats, in order.
    missing = [r for r in rows if r["stats"] is None and r["state"] == "RUNNING"]
    for row, err in zip(missing, errors):
        row["error"] = err
    return sorted(rows, key=lambda r: str(r["replica_id"]))


def _health(state: str, stats: ReplicaStats | None) -> dict[str, Any]:
    # The report is JSON (`status --json`): the record becomes its dict here.
    out: dict[str, Any] = {"stats": None if stats is None else stats.model_dump(), "error": None, "hit_rate": None}
    if stats is not None:
        q = stats.prefix_query_tokens
        out["hit_rate"] = stats.prefix_hit_tokens / q if q else None
    if state != "RUNNING":
        out["health"] = state.lower()
    elif stats is None:
        out["health"] = "no-stats"
    elif stats.draining:
        out["health"] = "draining"
    else:
        out["health"] = "healthy"
    return out


def _autoscaler(details: dict, overview: dict) -> dict[str, Any]:
    cfg = (details.get("deployment_config") or {}).get("autoscaling_config")
    detail = details.get("autoscaling_detail") or {}
    decisions = detail.get("decisions") or []
    return {
        "enabled": bool(cfg),
        "min_replicas": (cfg or {}).get("min_replicas"), "max_replicas": (cfg or {}).get("max_replicas"),
        "target_replicas": details.get("target_num_replicas", overview.get("target_replicas")),
        "running_replicas": overview.get("running_replicas"),
        "scaling_status": _enum_value(detail.get("scaling_status")),
        "last_decision": decisions[-1] if decisions else None,
    }


def _redis_url_from_app(details: dict, app_name: str, timeout_s: float) -> str | None:
    # Declarative deploys (KubeRay serveConfigV2, `serve deploy`) carry the config as app args.
    args = (details.get("deployed_app_config") or {}).get("args")
    if args:
        with contextlib.suppress(Exception):
            url = config_from_args(args).redis_url
            if url:
                return url
    # Imperative deploys (the local launcher): ask a replica, which holds the effective config.
    with contextlib.suppress(Exception):
        from ray import serve
        info = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name).model_info.remote().result(
            timeout_s=timeout_s)
        return info.redis_url
    return None


def check_redis(url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    import redis

    out: dict[str, Any] = {"url": redact_url(url), "reachable": False, "latency_ms": None, "error": None}
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        t0 = time.perf_counter()
        client.ping()
        out.update(reachable=True, latency_ms=round((time.perf_counter() - t0) * 1000, 2))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        client.close()
    return out


def redact_url(url: str) -> str:
    """The URL without its password (reports are printed and pasted into tickets)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


# ---------------------------------------------------------------- table


def render_table(report: dict[str, Any]) -> str:
    lines = [f"llm-cluster status  app={report.get('app')}  {report.get('status', '')}  "
             f"at {report.get('collected_at', '')}"]
    if report.get("error"):
        lines.append(f"error: {report['error']}")
        return "\n".join(lines)
    if report.get("message"):
        lines.append(f"message: {report['message']}")

    lines.append("")
    lines += _table(["DEPLOYMENT", "STATUS", "RUNNING/TARGET", "REPLICA STATES"], [
        [name, d["status"], f"{d['running_replicas']}/{_dash(d.get('target_replicas'))}",
         " ".join(f"{k}={v}" for k, v in sorted(d["replica_states"].items())) or "-"]
        for name, d in sorted(report.get("deployments", {}).items())])

    lines.append("")
    rows = []
    for r in report.get("replicas", []):
        s = r.get("stats") or {}
        rows.append([
            str(r["replica_id"]), _node(r), _dash(s.get("tp_size")), r["health"],
            f"{s['num_waiting']}/{s['num_running']}" if s else "-",
            _dash(s.get("pending_prefill_tokens")),
            f"{s['kv_usage'] * 100:.1f}%" if s.get("kv_usage") is not None else "-",
            f"{r['hit_rate'] * 100:.1f}%" if r.get("hit_rate") is not None else "-",
        ])
    lines += _table(["REPLICA", "NODE", "TP", "HEALTH", "WAIT/RUN", "PREFILL", "KV USE", "HIT RATE"], rows)
    for r in report.get("replicas", []):
        if r.get("error"):
            lines.append(f"  {r['replica_id']}: {r['error']}")

    a = report.get("autoscaler") or {}
    lines.append("")
    if a.get("enabled"):
        last = a.get("last_decision") or {}
        decided = (f"  last: {last.get('prev_num_replicas')}->{last.get('curr_num_replicas')} ({last.get('reason')})"
                   if last else "")
        lines.append(f"autoscaler: on  target={_dash(a.get('target_replicas'))} "
                     f"running={_dash(a.get('running_replicas'))} "
                     f"range=[{a.get('min_replicas')}, {a.get('max_replicas')}] {a.get('scaling_status') or ''}"
                     + decided)
    else:
        lines.append(f"autoscaler: off  replicas={_dash(a.get('target_replicas'))}")

    rd = report.get("redis") or {}
    if rd.get("reachable"):
        lines.append(f"redis: {rd['url']}  reachable ({rd['latency_ms']} ms)")
    else:
        lines.append(f"redis: {rd.get('url') or '?'}  UNREACHABLE  {rd.get('error') or ''}".rstrip())
    rr = report.get("redis_routing")
    if rr is not None:
        lines.append(_redis_routing_line(rr))
        lines += [f"  {INGRESS_DEPLOYMENT}: {e}" for e in rr.get("errors") or ()]
    return "\n".join(lines)


def _redis_routing_line(rr: dict[str, Any]) -> str:
    states = rr.get("breaker_states") or {}
    breaker = rr.get("breaker") or "-"  # "-": no router has opened the index yet
    if len(states) > 1:
        breaker += " (" + ", ".join(f"{states[s]} {s}" for s in reversed(_BREAKER_ORDER) if s in states) + ")"
    n = len(rr.get("routers") or ())
    return (f"redis routing ({n} ingress replica{'' if n == 1 else 's'}): breaker={breaker}  "
            f"lookup failures={_by_reason(rr.get('lookup_failures'))}  fallbacks={_by_reason(rr.get('fallbacks'))}")


def _by_reason(totals: dict[str, int] | None) -> str:
    totals = {k: v for k, v in (totals or {}).items() if v}
    if not totals:
        return "0"
    return f"{sum(totals.values())} (" + " ".join(f"{k}={v}" for k, v in sorted(totals.items())) + ")"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        rows = [["(none)"] + [""] * (len(header) - 1)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _node(r: dict) -> str:
    return r.get("node_ip") or (r.get("node_id") or "-")[:12]


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)
