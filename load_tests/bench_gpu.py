"""GPU benchmark of our engine on a real architecture's shape (random bf16 weights), against its floors.
Sections (--sections, comma list):

  parity    our bf16 engine vs transformers on the same weights: first 32 greedy tokens per prompt and the
            first token's top-5 logprobs, against transformers bf16 and against transformers fp32 (the
            reference: how far each bf16 implementation strays from it)
  decode    batch-1 decode ms/token (engine.step() wall, synchronised) and achieved GB/s against the floor
            (weight bytes / device-to-device copy GB/s, bytes read + written, measured in this run); the
            CUDA-graph replay alone (device time) shows the host's share
  ttft      time to first token of a 4096-token prefix + 32 new tokens, uncached vs the prefix cached
  workload  N requests (default 256), prompts uniform 256-1024 tokens, 128 output tokens, greedy, ignore_eos,
            all submitted at once: output tok/s; pure-decode vs mixed steps
  profile   kernel tables (torch.profiler) of the cached-prefix step, batch-1 decode, mixed and bs-256 decode
            steps, and a cProfile of the host side of bs-256 decode steps
  peer      transformers on the same weights and GPU, after our engine is gone: batch-1 generate() ms/token
            (same 128-token prompt and 128 tokens as `decode`) and continuous batching (generate_batch, paged
            sdpa) on the `workload` requests: output tok/s

Mixture-of-experts shapes (--shape qwen3-30b-a3b | mixtral-8x7b; --layers N keeps the per-layer shape at
fewer layers): the floor counts the bytes a batch-1 token reads, the router's top-k experts per layer and not
all of them (`floor_active_ms_per_token`); the expert GEMMs run grouped (torch grouped_mm).

    python -m load_tests.bench_gpu --shape qwen3-30b-a3b --sections decode,workload,peer --out-dir $OUT

    python -m load_tests.bench_gpu --out-dir $OUT                               # all sections
    python -m load_tests.bench_gpu --tp-size 2 --sections tokens,decode ...     # tensor parallel
    python -m load_tests.bench_gpu --compare a.json b.json                      # tp 2 vs tp 1 tokens
    python -m load_tests.bench_gpu --sections teacher,decode --out-dir tp1             # bf16 teacher reference
    python -m load_tests.bench_gpu --tp-size 2 --sections teacher,decode --teacher-ref tp1/bench_gpu.json ...

`tokens` records our greedy tokens and top-5 logprobs of the parity prompts (no transformers run), for
--compare. `teacher` (bf16 tp 2 vs tp 1, decidable despite random weights' near-tied logits): the tp-1 run
feeds each parity prompt + its own 32 greedy tokens through one prefill with every row's logits kept, and
transformers fp32 (loaded after our engine is gone) gives the same positions' exact logits, so each position
gets eps = max over the vocab of |our bf16 logit - fp32 logit| and tp 1's top-1/top-2 margin; the tp-2 run
(--teacher-ref tp1.json) feeds the same sequences and must take the same argmax wherever the margin exceeds
4 eps (if both runs stray from exact by <= eps, no other token can overtake), its top-5 logprobs close.

Peers (HF generate, transformers continuous batching) run in their own process on the same
machine in the same run: `load_tests/peer_engines.py`.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from load_tests.bench_engine import SHAPES, make_prompts

SECTIONS = ("parity", "decode", "ttft", "workload", "profile")  # also: tokens, teacher (not in the default)


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


# Mixture-of-experts shapes: (transformers config class, its kwargs).
MOE_SHAPES = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral-8x7b": ("MixtralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=8192, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def shape_config(shape: str, layers: int | None = None) -> dict:
    kw = dict(MOE_SHAPES[shape][1]) if shape in MOE_SHAPES else dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    return kw


def build_model(shape: str, out: Path, layers: int | None = None) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    from load_tests.tiny_model import build_tokenizer
    torch.manual_seed(0)
    cls = getattr(transformers, MOE_SHAPES[shape][0] if shape in MOE_SHAPES else "LlamaConfig")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cls(**shape_config(shape, layers)), dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(out))
    build_tokenizer().save_pretrained(str(out))  # only detokenizes; ids past its vocab decode to ""
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def hf_reference(model_dir: Path, prompts: list[list[int]], n_out: int, dtype: torch.dtype) -> list[dict]:
    """transformers greedy tokens and the first token's full log-softmax (CPU fp32)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                                 min_new_tokens=n_out, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            out.append({"tokens": gen.sequences[0, len(p):].tolist(),
                        "logprobs": gen.logits[0][0].float().log_softmax(-1).cpu()})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _equal_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_tokens(ours: list[dict], ref: list[dict]) -> dict:
    """ours/ref: per prompt {"tokens", "top": [(id, logprob)] of the first token} or a full "logprobs"."""
    prefix = [_equal_prefix(a["tokens"], b["tokens"]) for a, b in zip(ours, ref)]
    diffs, top1 = [], 0
    for a, b in zip(ours, ref):
        top1 += a["tokens"][0] == b["tokens"][0]
        if "logprobs" in b:
            diffs.append(max(abs(lp - float(b["logprobs"][i])) for i, lp in a["top"]))
        else:
            theirs = dict(b["top"])
            diffs.append(max((abs(lp - theirs[i]) for i, lp in a["top"] if i in theirs), default=float("nan")))
    n = len(prefix)
    return {"prompts": n, "all_32_equal": sum(p == len(a["tokens"]) for p, a in zip(prefix, ours)),
            "equal_prefix_lengths": prefix, "first_token_equal": top1,
            "max_abs_top5_logprob_diff": round(max(diffs), 4)}


def _top5(ref: dict) -> dict:
    top = ref["logprobs"].topk(5)
    return {"tokens": ref["tokens"], "top": list(zip(top.indices.tolist(), top.values.tolist()))}


def run_requests(engine, reqs) -> tuple[dict, list[tuple[float, int]], float]:
    """Submit all, step to completion. Returns ({"first": id -> seconds to first token, "tokens": id -> ids,
    "top": id -> first token's top logprobs}, [(step wall, tokens computed)], wall)."""
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    out = {"first": {}, "tokens": {}, "top": {}}
    steps = []
    while engine.has_unfinished():
        computed = engine.num_computed_tokens
        s = time.perf_counter()
        chunks = engine.step()
        torch.cuda.synchronize()
        e = time.perf_counter()
        steps.append((e - s, engine.num_computed_tokens - computed))
        for c in chunks:
            out["first"].setdefault(c.request_id, e - t0)
            out["tokens"].setdefault(c.request_id, []).extend(c.token_ids)
            if c.logprobs and c.request_id not in out["top"]:
                out["top"][c.request_id] = [(t, lp) for t, _, lp in c.logprobs[0].top]
    return out, steps, time.perf_counter() - t0


def kernel_table(prof, n: int = 18) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES) + sorted(MOE_SHAPES))
    ap.add_argument("--layers", type=int, help="override the shape's layer count (same per-layer shape)")
    ap.add_argument("--model-dir", type=Path, help="keep the random model here (built if missing), e.g. /dev/shm/m")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("-n", "--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--parity-prompts", type=int, default=8)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}, tokens, teacher")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--teacher-ref", type=Path, help="teacher section: the tp-1 run's bench_gpu.json to check against")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BASE_JSON", "OTHER_JSON"),
                    help="compare the `tokens` of two runs (e.g. tp 1 vs tp 2) and exit")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        res = {"base": str(args.compare[0]), "other": str(args.compare[1]),
               "tokens": compare_tokens(b["tokens"], a["tokens"]) if "tokens" in a and "tokens" in b else None,
               "decode_ms": [a.get("decode", {}).get("ms_per_token_median"),
                             b.get("decode", {}).get("ms_per_token_median")]}
        if all(res["decode_ms"]):
            res["decode_ratio"] = round(res["decode_ms"][1] / res["decode_ms"][0], 3)
        log(json.dumps(res))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "compare.json").write_text(json.dumps(res, indent=1))
        return res
    sections = set(filter(None, args.sections.split(",")))
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(["python -m load_tests.bench_gpu"] + (argv if argv is not None else sys.argv[1:])),
                 "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                 "shape": args.shape, "tp_size": args.tp_size}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out_dir / "bench_gpu.json").write_text(json.dumps(res, indent=1))

    res["d2d_GBps_rw"] = round(copy_bandwidth_gbps(), 1)
    log("d2d copy GB/s (read+write)", res["d2d_GBps_rw"])
    model_dir = args.model_dir or Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / \
        f"bench-{args.shape}{f'-{args.layers}l' if args.layers else ''}"
    if not (model_dir / "config.json").exists():
        t = time.perf_counter()
        build_model(args.shape, model_dir, args.layers)
        res["build_model_s"] = round(time.perf_counter() - t, 1)
    res["layers"] = shape_config(args.shape, args.layers)["num_hidden_layers"]
    vocab = shape_config(args.shape)["vocab_size"]
    parity_prompts = make_prompts(args.parity_prompts, 16, 256, vocab, seed=3)
    refs = None
    if "parity" in sections:
        t = time.perf_counter()
        refs = {"bf16": hf_reference(model_dir, parity_prompts, 32, torch.bfloat16),
                "fp32": hf_reference(model_dir, parity_prompts, 32, torch.float32)}
        res["hf_reference_s"] = round(time.perf_counter() - t, 1)
    teacher: dict = {}
    try:
        run_ours(model_dir, args, res, sections, parity_prompts, refs, save, teacher)
        if "logits" in teacher:  # tp 1: our engine is gone, so transformers fp32 fits beside nothing
            gc.collect()
            torch.cuda.empty_cache()
            res["teacher"] = teacher_reference(model_dir, teacher)
            log("teacher", json.dumps(res["teacher"]["summary"]))
        if "peer" in sections:
            gc.collect()
            torch.cuda.empty_cache()
            res["peer"] = transformers_peer(model_dir, args, vocab, save_to=res)
            save()
    finally:
        save()
    return res


def transformers_peer(model_dir: Path, args, vocab: int, save_to: dict) -> dict:
    """transformers on the same checkpoint (bf16, same GPU): batch-1 generate() and continuous batching on the
    `workload` section's requests (same prompts, 128 tokens each)."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    out: dict = {"transformers": transformers.__version__}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda").eval()
    single = make_prompts(1, 128, 128, vocab, seed=2)[0]
    ids = torch.tensor([single], device="cuda")
    gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))  # warm
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        torch.cuda.synchronize()
    out["generate_bs1_ms_per_token"] = round((time.perf_counter() - t) / 128 * 1000, 2)
    log("peer", out)
    prompts = make_prompts(args.num_requests, 256, 1024, vocab, seed=1)
    try:
        model.set_attn_implementation("paged|sdpa")
        cb = GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0,
                              eos_token_id=None, max_batch_tokens=4096, num_blocks=4096, block_size=128)
        with torch.inference_mode():
            model.generate_batch(inputs=prompts[:8], generation_config=cb)  # warm
            torch.cuda.synchronize()
            t = time.perf_counter()
            done = model.generate_batch(inputs=prompts, generation_config=cb)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        n_out = sum(len(r.generated_tokens) for r in done.values())
        out["continuous_batching"] = {"requests": len(prompts), "output_tokens": n_out, "wall_s": round(wall, 2),
                                      "output_tok_per_s": round(n_out / wall, 1)}
    except Exception as e:  # the peer's own failure is a result, not a crash of the bench
        out["continuous_batching"] = {"error": f"{type(e).__name__}: {e}"}
    ours = save_to.get("workload", {}).get("output_tok_per_s")
    cb_tps = out["continuous_batching"].get("output_tok_per_s")
    if ours and cb_tps:
        out["ours_x_transformers_workload"] = round(ours / cb_tps, 2)
    log("peer", out)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_ours(model_dir: Path, args, res: dict, sections: set, parity_prompts, refs, save, teacher: dict) -> None:
    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine
    from replicas.engine.protocol import GenerationRequest, SamplingParams

    vocab = shape_config(args.shape)["vocab_size"]
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", tp_size=args.tp_size, dtype=args.dtype,
                                    enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens))
    try:
        _run_sections(engine, args, res, sections, parity_prompts, refs, save, vocab, GenerationRequest,
                      SamplingParams, load_s=time.perf_counter() - t)
        if "teacher" in sections:  # last: it writes KV blocks outside the scheduler
            _teacher_section(engine, args, res, teacher)
            save()
    finally:
        engine.shutdown()


def _run_sections(engine, args, res, sections, parity_prompts, refs, save, vocab, GenerationRequest, SamplingParams,
                  load_s):
    res["engine_load_s"] = round(load_s, 1)  # weights, KV pool, graph capture (+ compile)
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    res["weights_GB_this_rank"] = round(weight_bytes / 1e9, 3)
    res["kv_blocks"] = runner.num_kv_blocks
    tp = runner.model.model.layers[0].self_attn.o_proj.tp
    res["tp_all_reduce"] = None if tp.size == 1 else "nccl" if tp.fast_all_reduce is None else "symm_mem one-shot"
    if runner.graphs is not None:
        g = runner.graphs
        res["graph_buckets"] = {"decode": sorted(g.decode), "decode_short": sorted(g.decode_short),
                                "mixed": sorted(g.mixed)}
    # With tp, each rank reads its shard in parallel: the floor is one shard's bytes over one GPU's bandwidth.
    res["floor_ms_per_token"] = round(weight_bytes / (res["d2d_GBps_rw"] * 1e9) * 1000, 3)
    margs = runner.model.args
    if margs.num_experts:  # batch 1 reads top-k of the experts of each layer
        expert_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                           if n.endswith(("experts.w13", "experts.w2")))
        active = weight_bytes - expert_bytes * (1 - margs.num_experts_per_tok / margs.num_experts)
        res["active_GB_per_token"] = round(active / 1e9, 3)
        res["floor_active_ms_per_token"] = round(active / (res["d2d_GBps_rw"] * 1e9) * 1000, 3)
    log(f"engine up in {res['engine_load_s']} s; weights {res['weights_GB_this_rank']} GB (this rank); "
        f"{runner.num_kv_blocks} KV blocks; floor {res['floor_ms_per_token']} ms/token")
    save()
    ids = iter(range(10**9))

    def req(prompt, n_out, **kw):
        return GenerationRequest(request_id=f"r{next(ids)}", prompt_token_ids=prompt,
                                 sampling=SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True, **kw))

    run_requests(engine, [req(p[:64], 8) for p in make_prompts(8, 64, 64, vocab, seed=9)])  # warm up

    if refs is not None or "tokens" in sections or "teacher" in sections:
        reqs = [req(p, 32, logprobs=5) for p in parity_prompts]
        out, _, _ = run_requests(engine, reqs)
        ours = [{"tokens": out["tokens"][r.request_id], "top": out["top"][r.request_id]} for r in reqs]
        res["tokens"] = ours
        if refs is not None:
            res["parity"] = {"ours_vs_hf_bf16": compare_tokens(ours, [_top5(r) for r in refs["bf16"]]),
                             "ours_vs_hf_fp32": compare_tokens(ours, refs["fp32"]),
                             "hf_bf16_vs_hf_fp32": compare_tokens([_top5(r) for r in refs["bf16"]], refs["fp32"])}
            log("parity", json.dumps(res["parity"]))
        save()

    if "decode" in sections:
        single = make_prompts(1, 128, 128, vocab, seed=2)[0]
        _, steps, _ = run_requests(engine, [req(single, 128)])
        dec = [s for s, _ in steps[1:]]
        ms = statistics.median(dec) * 1000
        res["decode"] = {"prompt": 128, "out": 128, "ms_per_token_median": round(ms, 3),
                         "ms_per_token_mean": round(sum(dec) / len(dec) * 1000, 3),
                         "achieved_GBps": round(weight_bytes / (ms / 1000) / 1e9, 1),
                         "x_floor": round(ms / res["floor_ms_per_token"], 3)}
        if "floor_active_ms_per_token" in res:
            res["decode"]["x_floor_active"] = round(ms / res["floor_active_ms_per_token"], 3)
        graphs = runner.graphs
        if graphs is not None and args.tp_size == 1:  # device time of the bs-1 graph alone
            # The bs-1 graph this decode replays: the short-context one (no split) while contexts are < 256.
            res["decode"]["graph_replay_ms"] = round(_replay_ms(graphs.decode_short.get(1, graphs.decode[1]).graph), 3)
        log("decode", res["decode"])
        save()

    if "ttft" in sections:
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

    if "workload" in sections:
        # Twice, on different prompts (no prefix-cache hits): the first run may still meet kernel variants not
        # yet compiled; the second is the steady state reported.
        for run, seed in (("workload_first_run", 21), ("workload", 1)):
            prompts = make_prompts(args.num_requests, 256, 1024, vocab, seed=seed)
            reqs = [req(p, 128) for p in prompts]
            out, steps, wall = run_requests(engine, reqs)
            n_out = sum(len(out["tokens"][r.request_id]) for r in reqs)
            res[run] = {"wall_s": round(wall, 2), "output_tok_per_s": round(n_out / wall, 1)}
            log(run, res[run])
        st = engine.stats()
        res["workload"] = {"requests": args.num_requests, "prompt_tokens": sum(map(len, prompts)),
                           "output_tokens": n_out, "wall_s": round(wall, 2),
                           "output_tok_per_s": round(n_out / wall, 1),
                           "total_tok_per_s": round((n_out + sum(map(len, prompts))) / wall, 1),
                           "steps": len(steps), "preemptions": st.num_preemptions,
                           "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                           "steps_detail": _step_summary(steps)}
        if runner.graphs is not None and args.tp_size == 1:
            big = max(runner.graphs.decode)
            res["workload"][f"graph_replay_bs{big}_ms"] = round(_replay_ms(runner.graphs.decode[big].graph), 3)
        log("workload", json.dumps(res["workload"]))
        save()

    if "profile" in sections:
        _profiles(engine, args, res, req, vocab)
        save()


def teacher_logits(engine, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits [T-1, V] (fp32, on the GPU) predicting tokens 1..T-1 of each sequence: one prefill step per
    sequence with every row sampled, through the runner (and every TP rank) as in serving."""
    from replicas.engine.model_runner import StepInputs
    from replicas.engine.protocol import SamplingParams
    from replicas.engine.sequence import Sequence
    runner, blocks, out = engine.runner, engine.block_manager, []
    for i, ids in enumerate(seqs):
        seq = Sequence(f"teacher{i}", 0, ids, SamplingParams(max_tokens=1))
        assert blocks.allocate(seq, len(ids))
        step = StepInputs(list(ids), [0], [len(ids)], [seq.block_table], list(range(len(ids) - 1)))
        with torch.inference_mode():
            if engine.workers is not None:
                with engine.workers.step():
                    engine.workers.channel.send(step)
                    logits = runner.execute(step)
            else:
                logits = runner.execute(step)
        out.append(logits.float().clone())
        blocks.free_seq(seq, uncache=True)
    return out


def _teacher_section(engine, args, res: dict, teacher: dict) -> None:
    if args.teacher_ref is None:  # the reference run: keep our logits for teacher_reference()
        if args.tp_size != 1:
            raise SystemExit("teacher: the reference run is tp 1; pass --teacher-ref to a tp>1 run")
        seqs = [p + t["tokens"] for p, t in zip(make_prompts(args.parity_prompts, 16, 256,
                                                             shape_config(args.shape)["vocab_size"], seed=3),
                                                res["tokens"])]
        teacher["seqs"] = seqs
        teacher["logits"] = [x.cpu() for x in teacher_logits(engine, seqs)]
        return
    ref = json.loads(args.teacher_ref.read_text())["teacher"]
    ours = teacher_logits(engine, ref["seqs"])
    agree = decidable = decidable_agree = 0
    lp_diff = 0.0
    for logits, pos in zip(ours, ref["positions"]):
        lps = logits.log_softmax(-1)
        am = logits.argmax(-1).tolist()
        for i, p in enumerate(pos):
            same = am[i] == p["top5"][0]
            agree += same
            if p["margin"] > 4 * p["eps"]:
                decidable += 1
                decidable_agree += same
            lp_diff = max(lp_diff, max(abs(float(lps[i, t]) - lp) for t, lp in zip(p["top5"], p["top5_logprob"])))
    n = sum(len(pos) for pos in ref["positions"])
    res["teacher_check"] = {
        "ref": str(args.teacher_ref), "positions": n, "argmax_equal": agree,
        "decidable_positions": decidable, "decidable_argmax_equal": decidable_agree,
        "max_abs_top5_logprob_diff_vs_ref": round(lp_diff, 4),
        "ref_max_abs_top5_logprob_diff_vs_fp32": ref["summary"]["max_abs_top5_logprob_diff_vs_fp32"],
        "passed": decidable_agree == decidable}
    log("teacher check", json.dumps(res["teacher_check"]))


def teacher_reference(model_dir: Path, teacher: dict) -> dict:
    """Per position of the tp-1 teacher run: our top-5 (ids, logprobs), top-1/top-2 logit margin, and eps =
    max over the vocab of |our logit - transformers fp32 logit| (our bf16 error at that position)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    positions, eps_all, lp_diff, agree = [], [], 0.0, 0
    with torch.inference_mode():
        for ids, ours in zip(teacher["seqs"], teacher["logits"]):
            ref = model(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
            ours = ours.cuda()
            eps = (ours - ref).abs().max(-1).values
            top = ours.topk(2, -1).values
            lps, ref_lps = ours.log_softmax(-1), ref.log_softmax(-1)
            top5 = lps.topk(5, -1)
            lp_diff = max(lp_diff, float((top5.values - ref_lps.gather(1, top5.indices)).abs().max()))
            agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
            positions.append([{"top5": i, "top5_logprob": [round(x, 5) for x in v], "margin": round(m, 5),
                               "eps": round(e, 5)}
                              for i, v, m, e in zip(top5.indices.tolist(), top5.values.tolist(),
                                                    (top[:, 0] - top[:, 1]).tolist(), eps.tolist())])
            eps_all += eps.tolist()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    n = len(eps_all)
    margins = [p["margin"] for pos in positions for p in pos]
    decidable = [(p["margin"] > 4 * p["eps"]) for pos in positions for p in pos]
    summary = {"positions": n, "eps_median": round(statistics.median(eps_all), 4), "eps_max": round(max(eps_all), 4),
               "margin_median": round(statistics.median(margins), 4), "decidable_positions": sum(decidable),
               "argmax_equal_fp32": agree, "max_abs_top5_logprob_diff_vs_fp32": round(lp_diff, 4)}
    return {"seqs": teacher["seqs"], "positions": positions, "summary": summary}


def _step_summary(steps: list[tuple[float, int]]) -> dict:
    """Steps bucketed by tokens computed: wall seconds and count per bucket."""
    buckets = {}
    for wall, n in steps:
        key = "1-256" if n <= 256 else "257-2048" if n <= 2048 else ">2048"
        b = buckets.setdefault(key, [0, 0.0, 0])
        b[0] += 1
        b[1] += wall
        b[2] += n
    return {k: {"steps": c, "wall_s": round(w, 3), "tokens": n, "ms_per_step": round(w / c * 1000, 2)}
            for k, (c, w, n) in sorted(buckets.items())}


def _replay_ms(graph) -> float:
    for _ in range(3):
        graph.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 20


def _cuda_ms(prof, steps: int = 1) -> float | None:
    """Device time of the profiled kernels per step."""
    try:
        us = sum(e.self_device_time_total for e in prof.key_averages() if str(e.device_type).endswith("CUDA"))
    except AttributeError:
        return None
    return round(us / steps / 1000, 2)


def _profiles(engine, args, res, req, vocab) -> None:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    out = args.out_dir

    def drain():
        while engine.has_unfinished():
            engine.step()

    # The cached-prefix step of the TTFT figure.
    prefix = make_prompts(1, 4096, 4096, vocab, seed=300)[0]
    a, b = make_prompts(2, 32, 32, vocab, seed=301)
    engine.add_request(req(prefix + a, 1))
    drain()
    engine.add_request(req(prefix + b, 1))
    with profile(activities=acts) as prof:
        drain()
        torch.cuda.synchronize()
    (out / "profile_ttft_cached.txt").write_text(
        kernel_table(prof, 25) + "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25,
                                                                  max_name_column_width=70))
    res["profile_ttft_cached_cuda_ms"] = _cuda_ms(prof)
    log("cached-prefix step:\n" + kernel_table(prof, 12))

    # Workload prefill steps (chunks of 8192 tokens with the admitted sequences decoding alongside).
    reqs = [req(p, 128) for p in make_prompts(args.num_requests, 256, 1024, vocab, seed=12)]
    for r in reqs:
        engine.add_request(r)
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    res["workload_prefill_step_ms_profiled"] = round((time.perf_counter() - t) / 3 * 1000, 1)
    res["workload_prefill_step_cuda_ms"] = _cuda_ms(prof, 3)
    for r in reqs:
        engine.abort_request(r.request_id)
    (out / "profile_workload_prefill.txt").write_text(
        kernel_table(prof, 25) + "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25,
                                                                  max_name_column_width=70))
    log("workload prefill steps:\n" + kernel_table(prof, 12))

    # Batch-1 decode.
    engine.add_request(req(make_prompts(1, 128, 128, vocab, seed=8)[0], 40))
    for _ in range(8):
        engine.step()
    with profile(activities=acts) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    drain()
    (out / "profile_decode_bs1.txt").write_text(kernel_table(prof, 30))
    prof.export_chrome_trace(str(out / "trace_decode_bs1.json"))

    # bs-256 decode: host side (cProfile) and kernels.
    for r in [req(p, 40) for p in make_prompts(args.max_num_seqs, 512, 512, vocab, seed=11)]:
        engine.add_request(r)
    sch = engine.scheduler
    while sch.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sch.running):
        engine.step()
    for _ in range(3):
        engine.step()
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    pr.enable()
    for _ in range(10):
        engine.step()
    pr.disable()
    torch.cuda.synchronize()
    res["decode_bs256_step_ms_under_cprofile"] = round((time.perf_counter() - t) * 100, 2)
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    (out / "cprofile_decode_bs256.txt").write_text(s.getvalue())
    log(s.getvalue()[:3500])
    t = time.perf_counter()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    res["decode_bs256_step_ms"] = round((time.perf_counter() - t) * 100, 2)
    with profile(activities=acts) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    drain()
    (out / "profile_decode_bs256.txt").write_text(kernel_table(prof, 30))
    log("bs-256 decode, 5 steps:\n" + kernel_table(prof, 12))


if __name__ == "__main__":
    main()
