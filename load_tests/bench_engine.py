"""Engine benchmark: offline throughput and single-stream decode latency of our engine against
transformers `generate()` on the same weights, in the same run.

    python -m load_tests.bench_engine --model tiny                 # CPU, tiny random model
    python -m load_tests.bench_engine --model smollm2 -n 32        # CPU, the embedded model
    python -m load_tests.bench_engine --device cuda --shape llama3-8b --out bench_8b.json
    python -m load_tests.bench_engine --device cuda --shape llama3-8b --tp-size 2 --skip-hf   # 2 GPUs

`--shape` builds a random-weight model of a real architecture's shape (bf16 on CUDA, no download):
speed does not depend on the weights' values. Prints a table and writes JSON (--out). With `--tp-size N`
the engine starts ranks 1..N-1 as local processes (GPU r on CUDA) and this process is rank 0; weight
bytes and GB/s are then rank 0's shard.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # SmolLM2-135M (the embedded model) for machines without its checkpoint.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model_dir(args, workdir: Path) -> Path:
    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        from load_tests.tiny_model import build_tokenizer
        out = workdir / args.shape
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], dtype=dtype)).to(dtype)
        model.save_pretrained(str(out))
        build_tokenizer().save_pretrained(str(out))  # only detokenizes; unknown ids decode to ""
        del model
        gc.collect()
        return out
    if args.model == "tiny":
        from load_tests.tiny_model import build_tiny_model
        return build_tiny_model(workdir / "tiny", hidden=args.tiny_hidden, layers=args.tiny_layers,
                                num_heads=args.tiny_hidden // 16, num_kv_heads=args.tiny_hidden // 32)
    if args.model == "smollm2":
        from replicas.engine.model_prep import prepare_embedded_model
        return prepare_embedded_model()
    return Path(args.model)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab - 3, (n_,), generator=g).tolist() for n_ in lens]


# ------------------------------------------------------------------ ours


def bench_ours(model_dir: Path, args, prompts: list[list[int]], single: list[int]) -> dict:
    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine

    cfg = EngineConfig(model=str(model_dir), device=args.device, block_size=16, tp_size=args.tp_size,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       **({"cpu_kv_cache_gib": args.cpu_kv_gib} if args.device == "cpu" else {}))
    t = time.perf_counter()
    engine = LLMEngine(cfg)
    try:
        return _bench_engine(engine, time.perf_counter() - t, args, prompts, single)
    finally:
        engine.shutdown()  # tp: stops the worker ranks


def _bench_engine(engine, load_s: float, args, prompts: list[list[int]], single: list[int]) -> dict:
    from replicas.engine.protocol import GenerationRequest, SamplingParams

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())

    def run(reqs):
        for r in reqs:
            engine.add_request(r)
        out_tokens, steps = 0, []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            chunks = engine.step()
            _sync(args.device)
            steps.append(time.perf_counter() - t0)
            out_tokens += sum(len(c.token_ids) for c in chunks)
        return out_tokens, steps

    def sp(n_out):
        return SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)

    # Warm up: kernels, allocator, the prefix cache stays cold (distinct prompts below).
    run([GenerationRequest(request_id=f"warm{i}", prompt_token_ids=p[:8], sampling=sp(4))
         for i, p in enumerate(prompts[:4])])
    # Single stream: the first step is the prefill, each later one decodes one token.
    _, steps_single = run([GenerationRequest(request_id="single", prompt_token_ids=single,
                                             sampling=sp(args.single_out))])
    decode_ms = sum(steps_single[1:]) / len(steps_single[1:]) * 1000
    reqs = [GenerationRequest(request_id=f"r{i}", prompt_token_ids=p, sampling=sp(args.output_len))
            for i, p in enumerate(prompts)]
    t = time.perf_counter()
    out_tokens, steps = run(reqs)
    wall = time.perf_counter() - t
    stats = engine.stats()
    return {"load_s": round(load_s, 2), "weights_GB": round(weight_bytes / 1e9, 3),
            "kv_blocks": stats.kv_blocks_total, "single_decode_ms_per_token": round(decode_ms, 2),
            "single_decode_GBps": round(weight_bytes / (decode_ms / 1000) / 1e9, 1),
            "single_prefill_ms": round(steps_single[0] * 1000, 1), "throughput_wall_s": round(wall, 2),
            "throughput_out_tok_per_s": round(out_tokens / wall, 1),
            "throughput_total_tok_per_s": round((out_tokens + sum(map(len, prompts))) / wall, 1),
            "throughput_steps": len(steps), "preemptions": stats.num_preemptions, "tp_size": args.tp_size}


# ------------------------------------------------------------------ transformers


def bench_hf(model_dir: Path, args, prompts: list[list[int]], single: list[int]) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device).eval()

    def generate(batch: list[list[int]], n_out: int) -> float:
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as generate() expects for decoder-only models
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gc_ = GenerationConfig(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        _sync(args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids.to(args.device), attention_mask=mask.to(args.device), generation_config=gc_)
        _sync(args.device)
        return time.perf_counter() - t

    generate([p[:8] for p in prompts[:4]], 4)  # warm up
    t_full = generate([single], args.single_out)
    t_one = generate([single], 1)
    decode_ms = (t_full - t_one) / (args.single_out - 1) * 1000
    t = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch_size):
        generate(prompts[i:i + args.hf_batch_size], args.output_len)
    wall = time.perf_counter() - t
    out_tokens = len(prompts) * args.output_len
    model = None  # the weights go before the next engine loads
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"single_decode_ms_per_token": round(decode_ms, 2), "throughput_wall_s": round(wall, 2),
            "throughput_out_tok_per_s": round(out_tokens / wall, 1),
            "throughput_total_tok_per_s": round((out_tokens + sum(map(len, prompts))) / wall, 1),
            "hf_batch_size": args.hf_batch_size}


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | path to a HF model directory")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead of --model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (local processes; GPUs on CUDA)")
    ap.add_argument("-n", "--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="32-128", help="min-max prompt tokens")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--single-prompt-len", type=int, default=64)
    ap.add_argument("--single-out", type=int, default=32)
    ap.add_argument("--hf-batch-size", type=int, default=16, help="generate() static batch size")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--cpu-kv-gib", type=float, default=1.0)
    ap.add_argument("--tiny-hidden", type=int, default=256)
    ap.add_argument("--tiny-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.prompt_len.split("-"))

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args, Path(tmp))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(args.num_requests, lo, hi, vocab, seed=1)
        single = make_prompts(1, args.single_prompt_len, args.single_prompt_len, vocab, seed=2)[0]
        hf = None if args.skip_hf else bench_hf(model_dir, args, prompts, single)
        ours = bench_ours(model_dir, args, prompts, single)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "model": args.shape or args.model,
        "workload": {"requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "single_prompt_len": args.single_prompt_len, "single_out": args.single_out},
        "ours": ours, "transformers": hf,
    }
    _print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


def _print_table(r: dict) -> None:
    ours, hf = r["ours"], r["transformers"] or {}
    rows = [("single-stream decode, ms/token", "single_decode_ms_per_token", False),
            (f"offline {r['workload']['requests']} req, output tok/s", "throughput_out_tok_per_s", True),
            ("offline, total (prompt+output) tok/s", "throughput_total_tok_per_s", True)]
    print(f"\nmodel {r['model']} on {r['machine']['gpu'] or r['machine']['processor']} "
          f"({r['machine']['threads']} threads), {r['date']}")
    print(f"{'figure':<40}{'ours':>12}{'generate()':>12}{'ratio':>8}")
    for name, key, higher_better in rows:
        a, b = ours.get(key), hf.get(key)
        ratio = "" if not b else f"{(a / b if higher_better else b / a):.2f}x"
        print(f"{name:<40}{a:>12}{b if b is not None else '-':>12}{ratio:>8}")
    print(f"weights {ours['weights_GB']} GB; single-stream decode reads them at {ours['single_decode_GBps']} GB/s")


if __name__ == "__main__":
    main()
