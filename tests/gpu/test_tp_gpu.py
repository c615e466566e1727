"""Tensor parallel on two GPUs (NCCL, CUDA graphs on every rank), run on the 2-GPU device machine; skipped
elsewhere with the reason. Equality is asserted in fp32, where greedy tokens are decidable (random bf16
weights give near-tied logits: bf16 tp 2 vs tp 1 is checked by teacher forcing in load_tests/bench_gpu.py).
A tp-2 process with CUDA graphs must also exit cleanly (a benchmark run once hung at exit)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA GPUs (tensor parallel over NCCL): the nvidia-h200-x2 device machine"),
    pytest.mark.timeout(300),
]

MAX_NEW = 10


def _prompts():
    prefix = random_prompts(1, 472, 40, 40, seed=31)[0]
    # Short prompts (mixed-step graphs), prefix hits, and one 300-token prompt: an eager step (> 256 tokens).
    return (random_prompts(6, 472, 1, 60, seed=32) + random_prompts(3, 472, 2, 9, seed=33, prefix=prefix)
            + random_prompts(1, 472, 300, 300, seed=34))


def _run(engine, prompts):
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 2, []).append(request(i, p, greedy(MAX_NEW)))
    chunks = run_all(engine, arrivals)
    return [tokens_of(chunks[str(i)]) for i in range(len(prompts))]


def test_tp2_cuda_graphs_fp32_equals_tp1_and_transformers(tiny_model_dir):
    kw = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=128, max_num_seqs=16,
              max_num_batched_tokens=512)
    prompts = _prompts()
    tp2 = make_engine(tiny_model_dir, tp_size=2, **kw)
    try:
        got = _run(tp2, prompts)
        replays = dict(tp2.runner.graphs.replays)
        # Small all-reduces go one-shot through symmetric memory (NCCL only for larger ones).
        assert tp2.runner.model.model.layers[0].mlp.down_proj.tp.fast_all_reduce is not None
        tp2.check_workers(10.0)
    finally:
        proc = tp2.workers.procs[0]
        tp2.shutdown()
    assert proc.exitcode == 0 and not dist.is_initialized()  # the stop message ended the worker's loop
    assert replays["decode"] > 0 and replays["mixed"] > 0
    want = _run(make_engine(tiny_model_dir, **kw), prompts)
    hf = HFReference(tiny_model_dir)
    for i, p in enumerate(prompts):
        assert got[i] == want[i], f"prompt {i} (len {len(p)}): tp2 != tp1"
        assert got[i] == hf.generate(p, MAX_NEW), f"prompt {i} (len {len(p)}): tp2 != transformers"


def test_tp2_cuda_graphs_process_exits_cleanly(tiny_model_dir, tmp_path):
    """Rank 0 in its own process: generate, shut down, return from the script; the interpreter's exit (CUDA
    graphs, NCCL communicators) must not hang, and the worker rank must be gone."""
    script = tmp_path / "tp2_exit.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "from tests.fixtures.engine import greedy, make_engine, request, run_all\n"
        "if __name__ == '__main__':\n"
        f"    e = make_engine({str(tiny_model_dir)!r}, tp_size=2, device='cuda', block_size=16, num_kv_blocks=64)\n"
        "    print('worker', e.workers.procs[0].pid, flush=True)\n"
        "    run_all(e, [request(0, [5, 6, 7, 8], greedy(6))])\n"
        "    assert e.runner.graphs.replays['decode'] > 0\n"
        "    e.shutdown()\n"
        "    print('shut down', flush=True)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "shut down" in proc.stdout
    worker = int(proc.stdout.split("worker ", 1)[1].split()[0])
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1][:3]
    print(f"tp2 + graphs process: {time.monotonic() - t0:.1f} s from start to exit")
