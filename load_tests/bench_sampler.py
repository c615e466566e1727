"""Micro-benchmark of the engine's per-step sampler (replicas.engine.sampler) and a host-sync audit.

Times one Sampler call (build of SamplingBatch included separately) for several batch sizes and
sampling mixes on a realistic vocabulary, and, on CUDA, runs the sampling math under
torch.cuda.set_sync_debug_mode("error") to prove that the only host sync is the final fetch.

    python -m load_tests.bench_sampler [--device cuda] [--vocab 128256] [--batch 1 32 64 256] [--zipf 1.2]

Logits follow a Zipf law (p ~ rank^-s, shuffled), a stand-in for a model's peaked next-token
distribution; --zipf 0 gives flat N(0, 1) logits, the worst case for top-p.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from replicas.engine.protocol import SamplingParams
from replicas.engine.sampler import Sampler, SamplingBatch, _with_logprobs

MIXES = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "greedy+logprobs5": lambda i: SamplingParams(temperature=0, logprobs=5),
    "temperature1": lambda i: SamplingParams(),  # OpenAI defaults: temperature 1, no filters
    "top_p0.9+top_k50": lambda i: SamplingParams(temperature=0.8, top_p=0.9, top_k=50),
    "top_k50": lambda i: SamplingParams(temperature=0.8, top_k=50),
    "seeded_top_p0.9": lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i),
    "penalties+min_p": lambda i: SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.1,
                                                presence_penalty=0.5, frequency_penalty=0.5),
    "mixed": lambda i: [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.95, seed=i),
                        SamplingParams(temperature=1.0, logprobs=2), SamplingParams(repetition_penalty=1.2)][i % 4],
}


def _rows(mix, batch, prompt_len, output_len):
    return [(MIXES[mix](i), list(range(prompt_len)), list(range(output_len)), 0) for i in range(batch)]


def _logits(batch, vocab, zipf, device):
    g = torch.Generator().manual_seed(0)
    if zipf <= 0:
        return torch.randn(batch, vocab, generator=g).to(device)
    ranks = torch.argsort(torch.rand(batch, vocab, generator=g), dim=-1).float() + 1
    return (-zipf * ranks.log() + 0.1 * torch.randn(batch, vocab, generator=g)).to(device)


def _time(fn, device, iters):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)


def audit_syncs(device, vocab):
    """Everything before the final fetch must run without a host sync."""
    sampler = Sampler()
    for mix in MIXES:
        b = SamplingBatch.build(_rows(mix, 16, 256, 32), device)
        logits = torch.randn(16, vocab, device=device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            raw = logits.log_softmax(-1)
            tokens = logits.argmax(-1) if b.greedy_only else sampler._sample(logits, b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _with_logprobs(tokens, raw, b)  # the one fetch
    return "no host sync before the fetch in any mix"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--zipf", type=float, default=1.2)
    args = ap.parse_args()
    device = torch.device(args.device)
    sampler = Sampler()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "vocab": args.vocab,
                      "prompt_len": args.prompt_len, "output_len": args.output_len, "zipf": args.zipf}))
    for batch in args.batch:
        logits = _logits(batch, args.vocab, args.zipf, device)
        for mix in MIXES:
            rows = _rows(mix, batch, args.prompt_len, args.output_len)
            b = SamplingBatch.build(rows, device)
            build_us = _time(lambda: SamplingBatch.build(rows, device), device, args.iters)
            # Sampler consumes its logits; the clone is timed separately and subtracted.
            clone_us = _time(lambda: logits.clone(), device, args.iters)
            call_us = _time(lambda: sampler(logits.clone(), b), device, args.iters) - clone_us
            print(json.dumps({"batch": batch, "mix": mix, "sampler_us": round(call_us, 1),
                              "build_us": round(build_us, 1)}))
    if device.type == "cuda":
        print(json.dumps({"sync_audit": audit_syncs(device, args.vocab)}))


if __name__ == "__main__":
    main()
