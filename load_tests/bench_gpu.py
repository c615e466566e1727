"""GPU benchmark of our engine on a real architecture's shape (random bf16 weights), against its floors:

  bandwidth   device-to-device copy GB/s (bytes read + written), measured here: the decode floor is
              weight bytes / that rate
  parity      our bf16 engine vs transformers bf16 on the same weights: first 32 greedy tokens per prompt,
              and the first token's top-5 logprobs
  decode      batch-1 decode ms/token (engine.step() wall, synchronised) and achieved GB/s; the CUDA-graph
              replay alone (device time) shows the host's share
  ttft        time to first token of a 4096-token prefix + 32 new tokens, uncached vs the prefix cached
  workload    N requests (default 256), prompts uniform 256-1024 tokens, 128 output tokens, greedy,
              ignore_eos, all submitted at once: output tok/s
  profile     the top CUDA kernels of a few mixed and decode steps (torch.profiler)

    python -m load_tests.bench_gpu --shape llama3-8b --out-dir $OUT

Peers (HF generate, transformers continuous batching) run in their own process, same machine, same run:
`load_tests/peer_engines.py`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from load_tests.bench_engine import SHAPES, make_prompts


def log(*a):
    print(*a, flush=True)


def copy_bandwidth_gbps() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1000 / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / dt / 1e9


def build_model(shape: str, root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_model import build_tokenizer
    out = root / shape
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(out))
    build_tokenizer().save_pretrained(str(out))  # only detokenizes; ids past its vocab decode to ""
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def hf_reference(model_dir: Path, prompts: list[list[int]], n_out: int) -> list[dict]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                                 min_new_tokens=n_out, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            lp = gen.logits[0][0].float().log_softmax(-1)
            top = lp.topk(5)
            out.append({"tokens": gen.sequences[0, len(p):].tolist(), "top_ids": top.indices.tolist(),
                        "top_lp": top.values.tolist()})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_requests(engine, reqs) -> tuple[dict, list[float], float]:
    """Submit all, step to completion. Returns (request id -> (first token time, tokens)), step walls, wall."""
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    firsts, tokens, steps = {}, {}, []
    while engine.has_unfinished():
        s = time.perf_counter()
        chunks = engine.step()
        torch.cuda.synchronize()
        e = time.perf_counter()
        steps.append(e - s)
        for c in chunks:
            firsts.setdefault(c.request_id, e - t0)
            tokens.setdefault(c.request_id, []).extend(c.token_ids)
            if c.logprobs:
                tokens.setdefault(c.request_id + "/lp", []).extend(c.logprobs)
    return {"first": firsts, "tokens": tokens}, steps, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("-n", "--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--parity-prompts", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: parity,decode,ttft,workload,profile")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(["python -m load_tests.bench_gpu"] + (argv if argv is not None else sys.argv[1:])),
                 "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out_dir / "bench_gpu.json").write_text(json.dumps(res, indent=1))

    res["d2d_GBps_rw"] = round(copy_bandwidth_gbps(), 1)
    log("d2d copy GB/s (read+write)", res["d2d_GBps_rw"])
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        t = time.perf_counter()
        model_dir = build_model(args.shape, Path(tmp))
        res["build_model_s"] = round(time.perf_counter() - t, 1)
        vocab = SHAPES[args.shape]["vocab_size"]
        parity_prompts = make_prompts(args.parity_prompts, 16, 256, vocab, seed=3)
        if "parity" not in skip:
            t = time.perf_counter()
            hf = hf_reference(model_dir, parity_prompts, 32)
            res["hf_reference_s"] = round(time.perf_counter() - t, 1)
        run_ours(model_dir, args, res, skip, parity_prompts, hf if "parity" not in skip else None, save)
    save()
    return res


def run_ours(model_dir: Path, args, res: dict, skip: set, parity_prompts, hf, save) -> None:
    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine
    from replicas.protocol import GenerationRequest, SamplingParams

    vocab = SHAPES[args.shape]["vocab_size"]
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens))
    res["engine_load_s"] = round(time.perf_counter() - t, 1)  # weights, KV pool, graph capture (+ compile)
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    res["weights_GB"] = round(weight_bytes / 1e9, 3)
    res["kv_blocks"] = runner.num_kv_blocks
    res["floor_ms_per_token"] = round(weight_bytes / (res["d2d_GBps_rw"] * 1e9) * 1000, 3)
    log(f"engine up in {res['engine_load_s']} s; weights {res['weights_GB']} GB; {runner.num_kv_blocks} KV blocks;"
        f" floor {res['floor_ms_per_token']} ms/token")
    save()
    ids = iter(range(10**9))

    def req(prompt, n_out, **kw):
        return GenerationRequest(request_id=f"r{next(ids)}", prompt_token_ids=prompt,
                                 sampling=SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True, **kw))

    run_requests(engine, [req(p[:64], 8) for p in make_prompts(8, 64, 64, vocab, seed=9)])  # warm up

    if hf is not None:
        out, _, _ = run_requests(engine, [req(p, 32, logprobs=5) for p in parity_prompts])
        rids = sorted((k for k in out["tokens"] if "/" not in k), key=lambda k: int(k[1:]))
        match, prefix_len, lp_diff, top1 = 0, [], [], 0
        for rid, ref in zip(rids, hf):
            toks = out["tokens"][rid]
            n = next((i for i, (a, b) in enumerate(zip(toks, ref["tokens"])) if a != b), len(toks))
            prefix_len.append(n)
            match += n == 32
            first = out["tokens"][rid + "/lp"][0]
            ours = {tid: lp for tid, _, lp in first.top}
            top1 += first.top[0][0] == ref["top_ids"][0]
            lp_diff.append(max(abs(ours[i] - v) for i, v in zip(ref["top_ids"], ref["top_lp"]) if i in ours))
        res["parity"] = {"prompts": len(hf), "all_32_equal": match, "equal_prefix_lengths": prefix_len,
                         "first_token_top1_equal": top1, "max_abs_top5_logprob_diff": round(max(lp_diff), 4)}
        log("parity", res["parity"])
        save()

    if "decode" not in skip:
        single = make_prompts(1, 128, 128, vocab, seed=2)[0]
        _, steps, _ = run_requests(engine, [req(single, 128)])
        dec = steps[1:]
        ms = statistics.median(dec) * 1000
        res["decode"] = {"prompt": 128, "out": 128, "ms_per_token_median": round(ms, 3),
                         "ms_per_token_mean": round(sum(dec) / len(dec) * 1000, 3),
                         "achieved_GBps": round(weight_bytes / (ms / 1000) / 1e9, 1),
                         "x_floor": round(ms / res["floor_ms_per_token"], 3)}
        graphs = runner.graphs
        if graphs is not None:  # device time of the bs-1 graph alone
            g = graphs.graphs[1]
            for _ in range(5):
                g.replay()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(50):
                g.replay()
            e.record()
            torch.cuda.synchronize()
            res["decode"]["graph_replay_ms"] = round(s.elapsed_time(e) / 50, 3)
        log("decode", res["decode"])
        save()

    if "ttft" not in skip:
        rows = []
        for i in range(3):
            prefix = make_prompts(1, 4096, 4096, vocab, seed=100 + i)[0]
            a, b = make_prompts(2, 32, 32, vocab, seed=200 + i)
            cold, _, _ = run_requests(engine, [req(prefix + a, 1)])
            warm, _, _ = run_requests(engine, [req(prefix + b, 1)])
            rows.append((next(iter(cold["first"].values())), next(iter(warm["first"].values()))))
        cold_ms = statistics.median(r[0] for r in rows) * 1000
        warm_ms = statistics.median(r[1] for r in rows) * 1000
        res["ttft"] = {"prefix": 4096, "new_tokens": 32, "uncached_ms": round(cold_ms, 2),
                       "cached_ms": round(warm_ms, 2), "speedup": round(cold_ms / warm_ms, 2),
                       "runs_ms": [[round(x * 1000, 2) for x in r] for r in rows]}
        log("ttft", res["ttft"])
        save()

    if "workload" not in skip:
        prompts = make_prompts(args.num_requests, 256, 1024, vocab, seed=1)
        out, steps, wall = run_requests(engine, [req(p, 128) for p in prompts])
        n_out = sum(len(v) for k, v in out["tokens"].items() if "/" not in k)
        st = engine.stats()
        res["workload"] = {"requests": args.num_requests, "prompt_tokens": sum(map(len, prompts)),
                           "output_tokens": n_out, "wall_s": round(wall, 2),
                           "output_tok_per_s": round(n_out / wall, 1),
                           "total_tok_per_s": round((n_out + sum(map(len, prompts))) / wall, 1),
                           "steps": len(steps), "preemptions": st.num_preemptions,
                           "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
        log("workload", res["workload"])
        save()

    if "profile" not in skip:
        from torch.profiler import ProfilerActivity, profile
        prompts = make_prompts(64, 256, 1024, vocab, seed=7)
        for r in [req(p, 16) for p in prompts]:
            engine.add_request(r)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(12):
                engine.step()
            torch.cuda.synchronize()
        while engine.has_unfinished():
            engine.step()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        (args.out_dir / "profile_mixed.txt").write_text(table)
        log(table[:6000])
        single = make_prompts(1, 128, 128, vocab, seed=8)[0]
        engine.add_request(req(single, 40))
        for _ in range(8):
            engine.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        while engine.has_unfinished():
            engine.step()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
        (args.out_dir / "profile_decode_bs1.txt").write_text(table)
        log(table[:4000])
        prof.export_chrome_trace(str(args.out_dir / "trace_decode_bs1.json"))


if __name__ == "__main__":
    main()
