"""CPU smoke run of the tensor-parallel benchmark path (`load_tests.bench_engine --tp-size 2`), the one the GPU
box runs with `--device cuda`: ranks spawned as local processes, no Serve; it must finish and stop them."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from load_tests.bench_engine import main

pytestmark = pytest.mark.timeout(300)


def test_bench_engine_tp2_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = main(["--model", "tiny", "--tiny-hidden", "64", "--tiny-layers", "2", "--tp-size", "2", "-n", "4",
              "--prompt-len", "8-16", "--output-len", "4", "--single-prompt-len", "8", "--single-out", "4",
              "--cpu-kv-gib", "0.01", "--skip-hf", "--out", str(out)])
    ours = r["ours"]
    assert ours["tp_size"] == 2 and ours["throughput_out_tok_per_s"] > 0 and ours["single_decode_ms_per_token"] > 0
    assert json.loads(out.read_text())["ours"] == ours
    assert not dist.is_initialized()  # the engine's shutdown stopped the worker rank and left the groups
