"""First request vs steady state, through the engine: is a freshly built engine already at speed?

One engine per process (what a cold start, an autoscaled replica or a replacement is): build it, then run the
same-shaped request `--repeats` times, one at a time, each with a fresh prompt (no prefix hit). Reports the
engine's build time and, for the first request and the median of the others, TTFT and ms per output token
after the first. Run it once with warm-up and once with `--no-warmup` (each in its own process, since kernels,
allocators and lazily loaded libraries are per process):

    python -m load_tests.bench_first_request                                   # embedded SmolLM2 on CPU
    python -m load_tests.bench_first_request --no-warmup
    python -m load_tests.bench_first_request --shape llama3-8b --model-dir /dev/shm/m --device cuda   # GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def run_one(engine, request_id: str, prompt: list[int], max_tokens: int) -> dict:
    from replicas.engine.protocol import GenerationRequest, SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.add_request(GenerationRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sp))
    stamps = []
    while engine.has_unfinished():
        for chunk in engine.step():
            stamps.extend([(time.perf_counter(), time.process_time())] * len(chunk.token_ids))
    n = len(stamps) - 1
    # Process CPU time beside wall time: on a busy shared CPU box, wall time mostly measures the neighbours.
    return {"ttft_ms": round((stamps[0][0] - t0) * 1e3, 2),
            "ms_per_token": round((stamps[-1][0] - stamps[0][0]) / n * 1e3, 3) if n else float("nan"),
            "ttft_cpu_ms": round((stamps[0][1] - c0) * 1e3, 2),
            "cpu_ms_per_token": round((stamps[-1][1] - stamps[0][1]) / n * 1e3, 3) if n else float("nan")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="model directory, or 'embedded' (SmolLM2)")
    ap.add_argument("--shape", help="GPU: build a random-weight model of this shape (load_tests.bench_engine.SHAPES)"
                    " into --model-dir first")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6, help="requests in all: the first, then steady state")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="other EngineConfig fields")
    ap.add_argument("--hold-s", type=float, default=0.0, help="keep the engine (its GPU memory) this long after "
                    "reporting: to start a second one beside it (gpu_share)")
    args = ap.parse_args(argv)

    import torch

    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine
    from replicas.engine.model_prep import resolve_engine_config

    model = args.model
    if args.shape:
        from load_tests.bench_gpu import build_model
        if not (args.model_dir / "config.json").exists():
            build_model(args.shape, args.model_dir)
        model = str(args.model_dir)
    fields = dict(kv.split("=", 1) for kv in args.set)
    cfg = resolve_engine_config(EngineConfig(model=model, device=args.device, warmup=not args.no_warmup, **fields))
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    build_s = time.perf_counter() - t0
    vocab = min(engine.vocab_size, len(engine.tokenizer))
    g = torch.Generator().manual_seed(0)
    runs = [run_one(engine, f"r{i}", torch.randint(100, vocab, (args.prompt_len,), generator=g).tolist(),
                    args.max_tokens) for i in range(args.repeats)]
    steady = runs[1:]
    out = {
        "warmup": cfg.warmup, "device": str(engine.runner.device), "model": Path(cfg.model).name,
        "threads": torch.get_num_threads(), "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "engine_build_s": round(build_s, 2), "kv_blocks": engine.runner.num_kv_blocks, "first": runs[0],
        "steady_median": {k: round(statistics.median(r[k] for r in steady), 3) for k in runs[0]} if steady else None,
        "runs": runs,
    }
    if steady:
        out["first_vs_steady"] = {k: round(runs[0][k] / out["steady_median"][k], 2) for k in runs[0]}
    print(json.dumps(out), flush=True)
    time.sleep(args.hold_s)
    engine.shutdown()
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
