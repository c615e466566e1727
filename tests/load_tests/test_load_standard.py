"""The standard suite's pieces that run without a cluster: the transformers-serve model directory, streams
without [DONE], the autoscaling timeline and routing targets, the servers plot, the suite index, the CLIs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread

from cluster.cli import main as cli_main
from load_tests.__main__ import main as load_tests_main
from load_tests.client import ClientConfig, run_load
from load_tests.report import plot_servers, write_comparison_report
from load_tests.sampler import TimePoint
from load_tests.standard import routing_targets, scaling_timeline
from load_tests.suite import Step, run_suite
from load_tests.transformers_serve import servable_dir
from load_tests.workloads import Arrival, Message, RequestSpec, ShareGPTConfig, Workload


def test_model_dir_without_architectures_is_served_through_links(tiny_model_dir, tmp_path):
    src = tmp_path / "prepared"
    shutil.copytree(tiny_model_dir, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("architectures", None)
    (src / "config.json").write_text(json.dumps(config))  # as our GGUF conversion writes it

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    served = servable_dir(src, scratch)
    assert served != src
    assert json.loads((served / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((src / "config.json").read_text()).get("architectures") is None  # source untouched
    weights = next(p for p in served.iterdir() if p.suffix == ".safetensors")
    assert weights.is_symlink() and weights.resolve() == (src / weights.name).resolve()
    assert servable_dir(Path(tiny_model_dir), tmp_path) == Path(tiny_model_dir)  # has one: served as is


async def test_stream_closed_after_last_chunk_counts_only_when_done_is_not_required(fake_openai):
    srv = fake_openai()
    spec = RequestSpec(id="cut", session_id="cut", messages=[Message(role="user", content="x [[truncate=2]]")],
                       max_tokens=8)
    wl = Workload(config=ShareGPTConfig(requests=1, arrival=Arrival(concurrency=1)), requests=[spec])
    strict = await run_load(wl, ClientConfig(url=srv.url, model="m"))
    lenient = await run_load(wl, ClientConfig(url=srv.url, model="m", require_done=False))
    assert strict.summary.errors == {"incomplete": 1}
    assert lenient.summary.ok == 1 and lenient.results[0].output_tokens == 2


def _points(rows):
    return [TimePoint(t_s=t, values={"replicas": r, "replicas_target": w, "queue_depth": q}) for t, r, w, q in rows]


def test_scaling_timeline_reads_decision_start_peak_and_return():
    pts = _points([(0, 1, 1, 0), (1, 1, 1, 5), (2, 1, 3, 9), (3, 2, 3, 7), (4, 3, 3, 2), (5, 3, 1, 0),
                   (6, 2, 1, 0), (7, 1, 1, 0)])
    assert scaling_timeline(pts) == {"scale_up_decided_s": 2, "more_replicas_running_s": 3, "peak_replicas": 3,
                                     "peak_at_s": 4, "back_to_min_s": 7, "max_queue_depth": 9}
    flat = scaling_timeline(_points([(0, 1, 1, 0), (1, 1, 1, 1)]))
    assert flat["scale_up_decided_s"] is None and flat["back_to_min_s"] is None and flat["peak_replicas"] == 1


def test_routing_targets_prefix_against_pow2():
    def row(hit, ttft, load):
        return {"hit_rate_client": hit, "ttft_p50_ms": ttft, "inflight_max_over_mean": load}
    t = routing_targets({"pow2": row(0.2, 400.0, 1.1), "prefix": row(0.7, 100.0, 1.6)})
    assert t["hit_rate_ratio"] == pytest.approx(3.5) and t["ttft_p50_speedup"] == pytest.approx(4.0)
    assert t["met"] == {"hit_rate_ratio": True, "ttft_p50_speedup": True, "prefix_busiest_over_mean_inflight": False}
    assert routing_targets({"pow2": row(0.0, 400.0, 1.0), "prefix": row(0.5, 100.0, 1.0)})["hit_rate_ratio"] is None
    assert routing_targets({"prefix": row(0.5, 100.0, 1.0)}) is None


async def test_servers_comparison_report(fake_openai, tmp_path):
    slow, fast = fake_openai(ttft_s=0.05, itl_s=0.02), fake_openai(ttft_s=0.01, itl_s=0.002)
    wl = Workload(config=ShareGPTConfig(requests=4, arrival=Arrival(concurrency=4)), requests=[
        RequestSpec(id=f"r{i}", session_id=f"r{i}", messages=[Message(role="user", content=f"hi {i}")], max_tokens=8)
        for i in range(4)])
    runs = {"theirs": await run_load(wl, ClientConfig(url=slow.url, model="m")),
            "ours": await run_load(wl, ClientConfig(url=fast.url, model="m"))}
    files = write_comparison_report(runs, tmp_path, title="servers", plot=plot_servers, plot_name="serving",
                                    notes="**ratio 5×**", extra={"comparison": {"ratio": 5.0}})
    img = imread(files.plots["serving"])
    assert img.shape[0] >= 300 and img[..., :3].std() > 0.05
    data = json.loads(Path(files.json_path).read_text())
    assert data["comparison"] == {"ratio": 5.0} and data["plots"] == {"serving": "serving.png"}
    md = Path(files.markdown_path).read_text()
    assert "**ratio 5×**" in md and "| theirs | 4/4 |" in md and "| ours | 4/4 |" in md
    for name, run in runs.items():  # each row is its own run's figures (not a speed check: a stalled box can swap them)
        s = run.summary
        assert f"| {name} | 4/4 | 0 | {s.request_throughput:.2f} | {s.output_throughput:.1f} |" in md
    assert runs["theirs"].summary.ttft_s.p50 >= 0.05  # the slow server's delay: it never answers early


def test_suite_index_has_headlines_times_links_and_load_average(tmp_path):
    def measured(base_url, out: Path) -> dict:
        assert base_url is None  # local steps start their own servers
        out.mkdir(parents=True)
        (out / "run.json").write_text("{}")
        return {"report": str(out / "run.json"), "headline": "42.0 tok/s"}

    def broken(base_url, out: Path) -> dict:
        raise TimeoutError("cluster not ready")

    results = run_suite(None, tmp_path, [Step("a", measured), Step("b", broken)], meta={"machine": "test box"},
                        progress=False)
    assert results["a"]["ok"] and not results["b"]["ok"]
    index = json.loads((tmp_path / "suite.json").read_text())
    assert index["url"] is None and set(index["durations_s"]) == set(index["load_average_1min"]) == {"a", "b"}
    assert index["meta"]["machine"] == "test box"
    assert "1 / 5 / 15 min" in index["meta"]["load_average_start"] and index["meta"]["load_average_end"]
    md = (tmp_path / "suite.md").read_text()
    assert "| a | ok: 42.0 tok/s |" in md and "[a/run.md](a/run.md) · a/run.json" in md
    assert "| b | TimeoutError: cluster not ready |" in md and "- machine: test box" in md


def test_local_suite_cli_and_llm_cluster_bench_reject_unknown_steps(tmp_path, capsys):
    assert load_tests_main(["suite", "--out", str(tmp_path / "a"), "--steps", "nope", "--no-progress"]) == 2
    assert "unknown steps ['nope']" in capsys.readouterr().err
    assert cli_main(["bench", "--quick", "--steps", "nope", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "have ['serving_vs_transformers', 'latency_throughput', 'routing_policies', 'autoscaling']" in err
    assert not (tmp_path / "a" / "suite.json").exists()
    with pytest.raises(SystemExit):
        cli_main(["status", "--bogus"])
