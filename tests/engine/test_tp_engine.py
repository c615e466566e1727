"""Tensor-parallel engine on CPU (tp_size=2, gloo; the worker rank is a local process, this process is rank 0):
greedy tokens equal tp_size=1 and transformers generate(), with heads split evenly, with fewer KV heads than
ranks, with a vocab that does not split evenly; a dead or hung worker fails the step instead of hanging;
shutdown leaves no process or process group behind."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from replicas.engine.async_engine import AsyncLLMEngine
from replicas.engine.config import EngineConfig
from replicas.engine.model_runner import StepInputs
from replicas.engine.parallel import ProcessWorkers, TPFailure, pack_step, unpack_step
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.timeout(300)

MAX_NEW = 8


def _tp_engine(model_dir, **kw):
    kw.setdefault("num_kv_blocks", 512)
    return make_engine(model_dir, tp_size=2, max_num_batched_tokens=2048, **kw)


def _worker(engine):
    (proc,) = engine.workers.procs
    return proc


def _staggered(prompts):
    """Two requests arrive per step: later ones join a batch that is already decoding."""
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 2, []).append(request(i, p, greedy(MAX_NEW)))
    return arrivals


def test_step_message_round_trip():
    step = StepInputs(token_ids=[5, 6, 7, 8], starts=[9, 0], lengths=[1, 3], block_tables=[[4, 2, 7], [1]],
                      sample_rows=[0, 3])
    assert unpack_step(pack_step(step)) == step
    empty_tables = StepInputs([1], [0], [1], [[]], [])
    assert unpack_step(pack_step(empty_tables)) == empty_tables


def test_tp2_matches_tp1_and_transformers(tiny_model_dir):
    r = random_prompts(4, 472, 1, 40, seed=11)
    prefix = random_prompts(1, 472, 24, 24, seed=12)[0]
    a, b = random_prompts(2, 472, 3, 9, seed=13, prefix=prefix)
    # b arrives a step after a: its prefix blocks hit rank 0's cache, which the worker's KV shard must
    # hold too (the same block ids on every rank).
    prompts = [r[0], r[1], a, r[2], r[3], b]
    # More ints than one step broadcast holds (tokens + block table): the message goes in two parts.
    prompts.append(random_prompts(1, 472, 1100, 1100, seed=14)[0])
    tp2 = _tp_engine(tiny_model_dir)
    try:
        attn = tp2.runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # 4 heads, 2 KV heads over 2 ranks
        assert tp2.runner.kv_cache.shape[-2] == 1
        got = run_all(tp2, _staggered(prompts))
        assert tp2.stats().prefix_hit_tokens > 0
        tp2.check_workers(5.0)
    finally:
        tp2.shutdown()
    want = run_all(make_engine(tiny_model_dir, max_num_batched_tokens=2048, num_kv_blocks=512), _staggered(prompts))
    hf = HFReference(tiny_model_dir)
    for i, p in enumerate(prompts):
        assert tokens_of(got[str(i)]) == tokens_of(want[str(i)]), f"prompt {i}: tp2 != tp1"
        assert tokens_of(got[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}: tp2 != transformers"


@pytest.fixture(scope="module")
def odd_vocab_kv1_model(tiny_model_factory, tmp_path_factory):
    """One KV head (fewer than the 2 ranks: replicated), tied embeddings, vocab 473 (odd: uneven split)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_factory(num_kv_heads=1, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-kv1-v473")
    model = AutoModelForCausalLM.from_pretrained(str(src))
    model.resize_token_embeddings(473, mean_resizing=False)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


async def test_tp2_fewer_kv_heads_than_ranks_odd_vocab_async(odd_vocab_kv1_model):
    """Through AsyncLLMEngine (its loop thread drives the collectives); shutdown stops the worker cleanly."""
    prompts = random_prompts(4, 472, 2, 30, seed=21)
    engine = AsyncLLMEngine(EngineConfig(model=str(odd_vocab_kv1_model), device="cpu", tp_size=2,
                                         num_kv_blocks=128, block_size=4))
    try:
        assert engine.engine.vocab_size == 473
        lm_head = engine.engine.runner.model.lm_head
        assert lm_head.weight.shape[0] == 237 and lm_head.weight is engine.engine.runner.model.model.embed_tokens.weight
        assert engine.engine.runner.model.model.layers[0].self_attn.num_kv_heads == 1

        async def gen(i, p):
            return [t async for c in engine.generate(request(i, p, greedy(MAX_NEW))) for t in c.token_ids]
        got = await asyncio.wait_for(asyncio.gather(*(gen(i, p) for i, p in enumerate(prompts))), 120)
        engine.check_workers(5.0)
    finally:
        proc = _worker(engine.engine)
        engine.shutdown()
    assert proc.exitcode == 0  # the stop message ended its loop (a kill would read -9)
    assert not dist.is_initialized()
    tp1 = make_engine(odd_vocab_kv1_model)
    want = run_all(tp1, [request(i, p, greedy(MAX_NEW)) for i, p in enumerate(prompts)])
    hf = HFReference(odd_vocab_kv1_model)
    for i, p in enumerate(prompts):
        assert got[i] == tokens_of(want[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}"


def test_dead_worker_fails_the_step_and_the_check(tiny_model_dir):
    engine = _tp_engine(tiny_model_dir, num_kv_blocks=64, tp_timeout_s=20)
    try:
        run_all(engine, [request("ok", [5, 6, 7], greedy(2))])
        engine.check_workers(5.0)
        proc = _worker(engine)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with pytest.raises(RuntimeError, match="exited"):
            engine.check_workers(5.0)
        engine.add_request(request("lost", [5, 6, 7], greedy(2)))
        t0 = time.monotonic()
        with pytest.raises(TPFailure):
            engine.step()
        assert time.monotonic() - t0 < 5  # the closed socket fails the collective at once, not tp_timeout_s
        with pytest.raises(TPFailure, match="broken"):  # the group is not reused
            engine.step()
    finally:
        engine.shutdown()
    assert not dist.is_initialized()


def test_hung_worker_times_out_instead_of_hanging(tiny_model_dir):
    engine = _tp_engine(tiny_model_dir, num_kv_blocks=64, tp_timeout_s=3)
    proc = _worker(engine)
    try:
        run_all(engine, [request("ok", [5, 6, 7], greedy(2))])
        os.kill(proc.pid, signal.SIGSTOP)
        engine.add_request(request("stuck", [5, 6, 7], greedy(2)))
        # The replica's event loop (health checks) must keep running while the engine thread waits.
        ticks, stop = [], threading.Event()

        def tick():
            while not stop.wait(0.05):
                ticks.append(1)
        ticker = threading.Thread(target=tick)
        ticker.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(TPFailure):
                engine.step()
        finally:
            stop.set()
            ticker.join()
        assert 2 < time.monotonic() - t0 < 60
        assert len(ticks) > 10  # the blocked collective released the GIL
        with pytest.raises(RuntimeError, match="step failed"):
            engine.check_workers(1.0)
    finally:
        engine.shutdown()
    assert not proc.is_alive() and not dist.is_initialized()


def test_failed_start_leaves_no_worker_or_group(tiny_model_factory):
    model_dir = tiny_model_factory(num_heads=3, num_kv_heads=1, hidden=48)  # 3 heads do not split over 2 ranks
    procs = []
    real_start = ProcessWorkers._start

    def start(self, host, port):
        real_start(self, host, port)
        procs.extend(self.procs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessWorkers, "_start", start)
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="not divisible"):
            _tp_engine(model_dir, num_kv_blocks=16)
    assert time.monotonic() - t0 < 60  # no waiting out a collective timeout
    assert procs and not any(p.is_alive() for p in procs)
    assert not dist.is_initialized()


def test_worker_exits_when_rank0_dies(tiny_model_dir):
    """A local worker rank whose rank 0 is killed (a benchmark stopped at its limit) does not linger."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
              "from tests.fixtures.engine import make_engine\n"
              f"e = make_engine({str(tiny_model_dir)!r}, tp_size=2, num_kv_blocks=16)\n"
              "print(e.workers.procs[0].pid, flush=True)\n"
              "import time; time.sleep(600)\n")
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(rank0.stdout.readline())
    finally:
        rank0.kill()
        rank0.wait()
    wait_until(lambda: not _running(worker_pid), 30, 0.1, "the worker rank to end with its rank 0")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
