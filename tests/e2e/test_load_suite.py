"""The standard suite end to end in --quick mode, on real local clusters: transformers serve and our SmolLM2
cluster, tiny-model replicas under two routing policies, an autoscaling burst. Every step's report files
(JSON, PNGs, markdown) and the index are written, and the numbers in them are sane."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from load_tests.standard import StandardConfig
from load_tests.suite import Step

# The suite starts and stops its own Ray clusters (ray.shutdown, serve.shutdown): it runs in a child
# process so it never touches the Ray instance other tests in this session share.
_RUN_QUICK_SUITE = """
import json, sys
from load_tests.standard import StandardConfig, run_standard_suite
results = run_standard_suite(sys.argv[1], config=StandardConfig.quick(), progress=False)
json.dump(results, open(sys.argv[2], "w"), default=str)
"""


def _png(path: Path) -> None:
    img = imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 400 and img[..., :3].std() > 0.05, path


def _run(step_dir: Path, name: str = "run.json") -> dict:
    return json.loads((step_dir / name).read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_suite_writes_sane_reports(smollm2_dir, tmp_path):
    c = StandardConfig.quick()
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-c", _RUN_QUICK_SUITE, str(tmp_path), str(out)],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = {k: r.get("traceback") for k, r in results.items() if not r["ok"]}
    assert not failed, failed
    index = json.loads((tmp_path / "suite.json").read_text())
    assert list(index["steps"]) == ["serving_vs_transformers", "latency_throughput", "routing_policies", "autoscaling"]
    md = (tmp_path / "suite.md").read_text()
    for name, r in results.items():
        assert f"| {name} | ok: {r['headline']} |" in md
        assert Path(r["report"]).with_suffix(".md").exists()

    # serving: every request answered by both servers, tok/s and the ratio from the same run
    s = results["serving_vs_transformers"]
    assert set(s["output_tok_per_s"]) == {"transformers serve", "llm-cluster"}
    assert s["ok"] == {"transformers serve": "8/8", "llm-cluster": "8/8"}
    assert all(n >= c.compare_requests * c.compare_max_tokens // 2 for n in s["output_tokens"].values())
    assert all(v > 0 for v in s["output_tok_per_s"].values())
    assert s["ratio_vs_best_transformers"] == pytest.approx(
        s["output_tok_per_s"]["llm-cluster"] / s["output_tok_per_s"]["transformers serve"])
    _png(tmp_path / "serving_vs_transformers" / "serving_throughput.png")

    # latency/throughput: all ok, latencies ordered as they must be
    lt = results["latency_throughput"]
    assert lt["ok"] == lt["sent"] == c.lt_requests and lt["output_throughput"] > 0
    summary = _run(tmp_path / "latency_throughput")["run"]["summary"]
    assert 0 < summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"] and summary["tpot_s"]["p50"] > 0
    _png(tmp_path / "latency_throughput" / "latency_cdf.png")

    # routing: both policies ran the whole workload over both replicas; hit rates are rates
    rp = results["routing_policies"]
    assert set(rp["policies"]) == {"pow2", "prefix"}
    for r in rp["policies"].values():
        assert r["ok"] == r["sent"] == c.routing_conversations * c.routing_turns
        assert 0.0 <= r["hit_rate_client"] <= 1.0 and r["ttft_p50_ms"] > 0
        assert r["prompt_share_max_over_mean"] >= 1.0  # busiest replica's prompt tokens / mean
    assert rp["prefix_vs_pow2"]["targets"]["hit_rate_ratio"] == ">= 3"
    _png(tmp_path / "routing_policies" / "policy_hit_rate.png")
    for policy in ("pow2", "prefix"):
        assert len(_run(tmp_path / "routing_policies" / policy)["run"]["summary"]["replicas"]) == c.routing_replicas

    # autoscaling: the burst queued work and the policy asked for another replica
    a = results["autoscaling"]
    assert a["ok"] == a["sent"] > 0 and a["status_samples"] >= 5
    assert a["max_queue_depth"] > 0 and a["scale_up_decided_s"] is not None
    assert a["scale_up_decided_s"] >= c.as_phases[0].duration_s  # not before the burst began
    assert 1 <= a["peak_replicas"] <= c.as_max_replicas
    _png(tmp_path / "autoscaling" / "replicas_vs_queue.png")


# Module-level step factories: the suite runs each step in a spawned process, which imports them from here.
def _crashing_step(c, shared):
    import os
    import signal
    return Step("_crashing_step", lambda url, out: os.kill(os.getpid(), signal.SIGSEGV))


def _failing_step(c, shared):
    def fn(url, out):
        raise ValueError("bad input")
    return Step("_failing_step", fn)


def _good_step(c, shared):
    import os
    return Step("_good_step", lambda url, out: {"pid": os.getpid(), "out": str(out)})


def test_each_step_runs_in_its_own_process_and_a_crash_loses_only_its_result(tmp_path):
    import os

    from load_tests.standard import _in_own_process
    from load_tests.suite import run_suite
    c = StandardConfig.quick()
    steps = [_in_own_process(f, c) for f in (_crashing_step, _failing_step, _good_step)]
    results = run_suite(None, tmp_path, steps, progress=False)
    assert not results["_crashing_step"]["ok"] and "exit code -11" in results["_crashing_step"]["error"]
    assert results["_failing_step"]["error"] == "RuntimeError: ValueError: bad input"
    assert "raise ValueError" in results["_failing_step"]["traceback"]  # the step process's traceback
    good = results["_good_step"]
    assert good["ok"] and good["pid"] != os.getpid() and good["out"] == str(tmp_path / "_good_step")
    assert json.loads((tmp_path / "suite.json").read_text())["steps"].keys() == results.keys()
