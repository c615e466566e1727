"""load_tests.bench_e2e end to end: the engine alone and `llm-cluster serve` over REST, same prompts, one
command, on the tiny random Llama on CPU with small sizes (the GPU run is the same code with the Llama-3-8B
shape and the default sizes). Its pieces without a cluster: tests/load_tests/test_bench_e2e.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests import bench_e2e
from tests.load_tests.test_bench_e2e import CONTRACT

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_engine_vs_rest_end_to_end(tiny_model_dir, tmp_path):
    requests, output_len = 6, 8
    cmd = [sys.executable, "-m", "load_tests.bench_e2e", "--shape", "tiny", "--out", str(tmp_path),
           "--model-dir", str(tiny_model_dir), "--requests", str(requests), "--warmup-requests", "4",
           "--prompt-len", "8-32", "--output-len", str(output_len), "--short-prompt-len", "16", "--short-out", "8",
           "--short-repeats", "2", "--prefix-len", "256", "--prefix-new", "8", "--prefix-repeats", "1",
           "--client-procs", "2", "--phase-timeout-s", "300"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    sve = res["serve_vs_engine"]
    assert set(CONTRACT) <= set(sve), sve
    assert sve["errors"] == 0
    assert sve["engine_output_tok_per_s"] > 0 and sve["rest_output_tok_per_s"] > 0 and sve["rest_over_engine"] > 0
    assert 0 < sve["rest_ttft_p50_ms"] <= sve["rest_ttft_p99_ms"]
    assert isinstance(sve["ttft_added_ms_p50"], float)
    assert sve["cached_prefix_ttft_speedup_rest"] > 0 and sve["cached_prefix_ttft_speedup_engine"] > 0
    for side in ("engine", "rest"):
        # Same prompts, greedy, ignore_eos: each side produced exactly the tokens asked for, every phase.
        assert res[side]["workload"]["output_tokens"] == requests * output_len, res[side]
        assert res[side]["warmup"]["output_tokens"] == 4 * output_len
        assert res[side]["first"]["ttft_ms"] > 0 and len(res[side]["short"]["ttft_ms"]) == 2
        assert res[side]["prefix"]["uncached_ms"] > 0 and res[side]["prefix"]["cached_ms"] > 0
    assert res["rest"]["stop"]["rc"] == 0  # SIGINT to the launcher's group stopped it cleanly
    assert res["rest"]["command"].startswith("-m cluster.cli serve --model")
    for phase in bench_e2e.PHASES:  # one summary line per phase and side
        assert f"engine {phase}" in out and f"rest   {phase}" in out
