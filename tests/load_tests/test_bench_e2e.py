"""load_tests.bench_e2e: the engine alone and `llm-cluster serve` over REST, same prompts, one command. Its
pieces here (prompts, derived figures, the staged tokenizer); the end-to-end run on the tiny random Llama:
tests/e2e/test_bench_e2e_run.py."""
from __future__ import annotations

import json
import lzma

from load_tests import bench_e2e

CONTRACT = ("engine_output_tok_per_s", "rest_output_tok_per_s", "rest_ttft_p50_ms", "rest_ttft_p99_ms",
            "ttft_added_ms_p50", "cached_prefix_ttft_speedup_rest", "errors", "rest_over_engine")


def _args(**kw):
    return bench_e2e._parse(["--shape", "tiny", "--out", "x", *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]])


def test_prompts_are_seeded_and_shaped_by_the_options():
    args = _args(requests=5, warmup_requests=3, prompt_len="10-20", short_prompt_len=7, short_repeats=2,
                 prefix_len=50, prefix_new=4, prefix_repeats=2)
    p = bench_e2e.make_phase_prompts(args, 512)
    assert p == bench_e2e.make_phase_prompts(args, 512)  # both sides get the same prompts from the seed
    assert len(p["workload"]) == 5 and len(p["warmup"]) == 3 and p["warmup"] != p["workload"][:3]
    assert all(10 <= len(x) <= 20 for x in p["workload"] + p["warmup"])
    assert len(p["first"]) == 7 and [len(x) for x in p["short"]] == [7, 7]
    assert [[len(x) for x in trio] for trio in p["prefix"]] == [[50, 4, 4]] * 2
    ids = [t for x in p["workload"] for t in x]
    assert 100 <= min(ids) and max(ids) < 412  # clear of the vocabulary's ends (special tokens)


def test_compare_derives_the_contract_keys():
    engine = {"workload": {"output_tok_per_s": 1000.0, "ttft_p50_ms": 50.0, "ttft_p99_ms": 90.0, "errors": 0},
              "short": {"ttft_p50_ms": 10.0, "errors": 0}, "prefix": {"speedup": 12.0, "errors": 0}}
    rest = {"workload": {"output_tok_per_s": 900.0, "ttft_p50_ms": 60.0, "ttft_p99_ms": 120.0, "errors": 2},
            "short": {"ttft_p50_ms": 13.5, "errors": 0}, "prefix": {"speedup": 4.0, "errors": 1}}
    sve = bench_e2e.compare(engine, rest)
    assert set(CONTRACT) <= set(sve)
    assert sve["rest_over_engine"] == 0.9 and sve["ttft_added_ms_p50"] == 3.5
    assert sve["cached_prefix_ttft_speedup_rest"] == 4.0 and sve["errors"] == 3
    # A side that died counts as an error, and its figures are absent, not zero.
    sve = bench_e2e.compare({"failed": 1}, rest)
    assert sve["errors"] == 4 and sve["engine_output_tok_per_s"] is None and sve["rest_over_engine"] is None


def test_wave_figures():
    rows = [{"ttft": 0.01 * i, "e2e": 1.0, "n": 10, "err": None} for i in range(1, 101)]
    rows.append({"ttft": None, "e2e": None, "n": 0, "err": "http 500"})
    fig = bench_e2e.wave_figures(rows, 2.0)
    assert fig["ok"] == 100 and fig["errors"] == 1 and fig["error_samples"] == ["http 500"]
    assert fig["output_tok_per_s"] == 500.0 and fig["ttft_p50_ms"] == 500.0 and fig["ttft_p99_ms"] == 990.0


def test_staged_tokenizer_is_restored_byte_for_byte(tmp_path):
    src = tmp_path / "staged"
    src.mkdir()
    original = json.dumps({"model": {"vocab": {"a": 0}}}).encode()
    (src / "tokenizer.json.xz").write_bytes(lzma.compress(original))
    (src / "tokenizer_config.json").write_text("{}")
    bench_e2e.copy_tokenizer(src, tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == original
    assert (tmp_path / "model" / "tokenizer_config.json").read_text() == "{}"
