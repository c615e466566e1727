"""Benchmark reports: JSON with every number, PNG plots (matplotlib Agg) and a markdown summary.

- one run: latency CDFs (TTFT, ITL, E2E), per-replica load (from x-replica-id), replicas against
  queue depth over time (from the sampled status time series)
- a sweep: throughput and latency against offered load, plus each run's own report
- a comparison (routing policies: cache hit rate, TTFT and load balance by policy; or servers: tok/s,
  TTFT, TPOT by server), plus each run's report

A plot that has no data to show is left out and the reason is listed under "skipped" in the JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, Field

from load_tests.client import RunResult
from load_tests.metrics import Summary


class ReportFiles(BaseModel):
    json_path: str
    markdown_path: str
    plots: dict[str, str] = Field(default_factory=dict)  # plot name -> PNG path
    skipped: dict[str, str] = Field(default_factory=dict)  # plot name -> why it was not drawn


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return str(path)


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.1f}"


def summary_table(rows: dict[str, Summary]) -> str:
    """Markdown table: one row per run (a single run, sweep points or policies)."""
    head = ("| run | ok/sent | errors | req/s | out tok/s | goodput req/s | TTFT p50 ms | TTFT p99 ms | "
            "TPOT p50 ms | ITL p99 ms | E2E p50 ms | cache hit | max/mean load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    p = lambda d, k: None if d is None else getattr(d, k)  # noqa: E731
    for name, s in rows.items():
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "0"
        hit = "–" if s.cache_hit_rate is None else f"{s.cache_hit_rate:.1%}"
        skew = "–" if s.max_over_mean_load is None else f"{s.max_over_mean_load:.2f}"
        lines.append(f"| {name} | {s.ok}/{s.sent} | {errors} | {s.request_throughput:.2f} | "
                     f"{s.output_throughput:.1f} | {s.goodput:.2f} | {_ms(p(s.ttft_s, 'p50'))} | "
                     f"{_ms(p(s.ttft_s, 'p99'))} | {_ms(p(s.tpot_s, 'p50'))} | {_ms(p(s.itl_s, 'p99'))} | "
                     f"{_ms(p(s.e2e_s, 'p50'))} | {hit} | {skew} |")
    return "\n".join(lines) + "\n"


def plot_latency_cdfs(run: RunResult, path: Path) -> str:
    ok = [r for r in run.results if r.ok]
    series = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
              "ITL": [x for r in ok for x in r.itl_s],
              "E2E": [r.e2e_s for r in ok if r.e2e_s is not None]}
    fig, axes = _figure(3, width=4.5)
    for ax, (name, values) in zip(axes, series.items()):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = sorted(v * 1000 for v in values)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        for q in (0.5, 0.99):
            x = xs[min(len(xs) - 1, int(q * len(xs)))]
            ax.axvline(x, ls=":", color="gray")
            ax.annotate(f"p{int(q * 100)} {x:.0f}", (x, q), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_ylim(0, 1.02)
    return _save(fig, path)


def plot_replica_load(summary: Summary, path: Path) -> str:
    names = list(summary.replicas)
    counts = [summary.replicas[n].requests for n in names]
    mean = sum(counts) / len(counts)
    fig, (ax,) = _figure(1, width=max(5.0, 0.6 * len(names) + 3))
    ax.bar(range(len(names)), counts)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.axhline(mean, ls="--", color="gray", label="mean")
    ax.axhline(1.5 * mean, ls=":", color="red", label="1.5 × mean")
    ax.set_ylim(0, max(max(counts), 1.5 * mean) * 1.2)  # room for the legend above the bars
    ax.set_ylabel("requests served")
    ax.set_title(f"Load per replica (max/mean {summary.max_over_mean_load:.2f})")
    ax.legend()
    return _save(fig, path)


def _series(run: RunResult, key: str) -> tuple[list[float], list[float]]:
    pts = [(p.t_s, p.values[key]) for p in run.timeseries if key in p.values]
    return [t for t, _ in pts], [v for _, v in pts]


def plot_replicas_vs_queue(run: RunResult, path: Path, replicas_key: str, queue_key: str) -> str:
    fig, (ax,) = _figure(1, width=7)
    t, n = _series(run, replicas_key)
    ax.step(t, n, where="post", color="tab:blue", label=f"{replicas_key} (running)")
    tt, target = _series(run, replicas_key + "_target")  # wanted by the autoscaler, when the status says
    if target:
        ax.step(tt, target, where="post", color="tab:blue", ls="--", alpha=0.6, label=f"{replicas_key} wanted")
        ax.legend(loc="upper left")
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel("replicas", color="tab:blue")
    ax.set_ylim(0, max(n + target) + 1)
    ax2 = ax.twinx()
    tq, q = _series(run, queue_key)
    ax2.plot(tq, q, color="tab:orange", label=queue_key)
    ax2.set_ylabel("queue depth", color="tab:orange")
    ax.set_title("Replicas against queue depth")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _write(out: Path, stem: str, payload: dict, markdown: str, plots: dict, skipped: dict) -> ReportFiles:
    files = ReportFiles(json_path=str(out / f"{stem}.json"), markdown_path=str(out / f"{stem}.md"),
                        plots=plots, skipped=skipped)
    payload = {**payload, "plots": {k: Path(v).name for k, v in plots.items()}, "skipped": skipped}
    Path(files.json_path).write_text(json.dumps(payload, indent=1))
    images = "".join(f"\n![{k}]({Path(v).name})\n" for k, v in plots.items())
    notes = "".join(f"- {k}: not drawn ({why})\n" for k, why in skipped.items())
    Path(files.markdown_path).write_text(markdown + images + ("\n" + notes if notes else ""))
    return files


def write_run_report(run: RunResult, out_dir: str | Path, *, title: str = "run", replicas_key: str = "replicas",
                     queue_key: str = "queue_depth") -> ReportFiles:
    """run.json (config, every request, summary, time series), run.md and the PNGs into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, skipped = {"latency_cdf": plot_latency_cdfs(run, out / "latency_cdf.png")}, {}
    if run.summary.replicas:
        plots["replica_load"] = plot_replica_load(run.summary, out / "replica_load.png")
    else:
        skipped["replica_load"] = "no x-replica-id on any response"
    keys = {k for p in run.timeseries for k in p.values}
    if replicas_key in keys and queue_key in keys:
        plots["replicas_vs_queue"] = plot_replicas_vs_queue(run, out / "replicas_vs_queue.png", replicas_key, queue_key)
    else:
        skipped["replicas_vs_queue"] = (f"no status samples with {replicas_key!r} and {queue_key!r}"
                                        + (f" (have {sorted(keys)[:8]})" if keys else ""))
    s = run.summary
    md = (f"# {title}\n\n{run.url}, model `{run.model}`, workload `{run.workload.get('kind')}`, "
          f"{run.arrival_kind} at offered load {run.offered_load:g}, {s.duration_s:.1f} s\n\n"
          + summary_table({title: s}))
    return _write(out, "run", {"kind": "run", "title": title, "run": run.model_dump(mode="json")}, md, plots, skipped)


def plot_sweep(runs: list[RunResult], path: Path) -> str:
    runs = sorted(runs, key=lambda r: r.offered_load)
    x = [r.offered_load for r in runs]
    label = "concurrency" if runs and runs[0].arrival_kind == "closed_loop" else "offered rate (req/s)"
    fig, (a1, a2) = _figure(2)
    a1.plot(x, [r.summary.output_throughput for r in runs], "o-", label="output tok/s")
    a1.set_xlabel(label)
    a1.set_ylabel("output tokens / s")
    a1b = a1.twinx()
    a1b.plot(x, [r.summary.request_throughput for r in runs], "s--", color="tab:green", label="req/s")
    a1b.plot(x, [r.summary.goodput for r in runs], "^:", color="tab:red", label="goodput req/s")
    a1b.set_ylabel("requests / s")
    a1.set_title("Throughput against offered load")
    a1.legend(loc="upper left")
    a1b.legend(loc="lower right")
    for q, style in (("p50", "o-"), ("p99", "s--")):
        a2.plot(x, [None if r.summary.ttft_s is None else getattr(r.summary.ttft_s, q) * 1000 for r in runs],
                style, label=f"TTFT {q}")
        a2.plot(x, [None if r.summary.tpot_s is None else getattr(r.summary.tpot_s, q) * 1000 for r in runs],
                style, label=f"TPOT {q}")
    a2.set_xlabel(label)
    a2.set_ylabel("ms")
    a2.set_title("Latency against offered load")
    a2.legend()
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def write_sweep_report(runs: list[RunResult], out_dir: str | Path, *, title: str = "sweep") -> ReportFiles:
    """sweep.json/md and sweep_throughput.png; each point's full run report under load_<x>/."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for r in sorted(runs, key=lambda r: r.offered_load):
        sub = write_run_report(r, out / f"load_{r.offered_load:g}", title=f"{title} @ {r.offered_load:g}")
        points.append({"offered_load": r.offered_load, "arrival_kind": r.arrival_kind,
                       "summary": r.summary.model_dump(mode="json"),
                       "report": str(Path(sub.json_path).relative_to(out))})
    plots = {"sweep_throughput": plot_sweep(runs, out / "sweep_throughput.png")} if runs else {}
    skipped = {} if runs else {"sweep_throughput": "no runs"}
    md = f"# {title}\n\n" + summary_table({f"load {r.offered_load:g}": r.summary
                                            for r in sorted(runs, key=lambda r: r.offered_load)})
    return _write(out, "sweep", {"kind": "sweep", "title": title, "points": points}, md, plots, skipped)


def plot_policies(summaries: dict[str, Summary], path: Path) -> str:
    names = list(summaries)
    fig, axes = _figure(3, width=4.0)
    panels = [("cache hit rate", [s.cache_hit_rate or 0.0 for s in summaries.values()]),
              ("TTFT p50 (ms)", [0.0 if s.ttft_s is None else s.ttft_s.p50 * 1000 for s in summaries.values()]),
              ("max / mean replica load", [s.max_over_mean_load or 0.0 for s in summaries.values()])]
    for ax, (label, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 1.05)
    axes[2].axhline(1.5, ls=":", color="red")
    return _save(fig, path)


def plot_servers(summaries: dict[str, Summary], path: Path) -> str:
    """Servers side by side on one workload: output tok/s (with each one's multiple of the first), TTFT, TPOT."""
    names = list(summaries)
    colors = [f"C{i}" for i in range(len(names))]
    fig, axes = _figure(3, width=4.0)
    tok = [s.output_throughput for s in summaries.values()]
    bars = axes[0].bar(names, tok, color=colors)
    base = tok[0] or None
    axes[0].bar_label(bars, labels=[f"{v:.1f}" + (f"\n{v / base:.2f}×" if base and i else "")
                                    for i, v in enumerate(tok)], fontsize=8)
    axes[0].set_title(f"output tokens / s (×: multiple of {names[0]})" if len(names) > 1 else "output tokens / s",
                      fontsize=9 if len(names) > 1 else None)
    axes[0].set_ylim(0, max(tok + [1.0]) * 1.3)
    for ax, key, label in ((axes[1], "ttft_s", "TTFT (ms)"), (axes[2], "tpot_s", "TPOT (ms)")):
        for j, q in enumerate(("p50", "p99")):
            vals = [0.0 if getattr(s, key) is None else getattr(getattr(s, key), q) * 1000 for s in summaries.values()]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
            b = ax.bar(xs, vals, width=0.38, color=colors, alpha=1.0 if j == 0 else 0.5, label=q)
            ax.bar_label(b, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{label}: p50 (solid), p99 (light)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
    return _save(fig, path)


def write_comparison_report(runs: dict[str, RunResult], out_dir: str | Path, *, title: str = "policies",
                            plot=plot_policies, plot_name: str = "policy_hit_rate", notes: str = "",
                            extra: dict | None = None) -> ReportFiles:
    """comparison.json/md and the comparison plot (`plot`, saved as <plot_name>.png: the policy panels by
    default, plot_servers for servers); each run's full report under <name>/. `notes` (markdown) and
    `extra` (JSON) carry what the caller measured beside the runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, r in runs.items():
        sub = write_run_report(r, out / name, title=f"{title}: {name}")
        entries[name] = {"summary": r.summary.model_dump(mode="json"),
                         "report": str(Path(sub.json_path).relative_to(out))}
    summaries = {k: r.summary for k, r in runs.items()}
    plots = {plot_name: plot(summaries, out / f"{plot_name}.png")} if runs else {}
    skipped = {} if runs else {plot_name: "no runs"}
    md = f"# {title}\n\n" + summary_table(summaries) + (f"\n{notes}\n" if notes else "")
    return _write(out, "comparison", {"kind": "comparison", "title": title, "runs": entries, **(extra or {})}, md,
                  plots, skipped)
