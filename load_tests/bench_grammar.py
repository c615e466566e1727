"""Cost of structured outputs: grammar masking's share of an engine decode step, at batch 1 and 64.

For each batch size, B sequences decode (after their prefill) once without and once with a JSON Schema grammar
(an array of >= 200 small objects, so no sequence can finish inside the timed steps and the grammar walks
through numbers, strings, booleans, keys and separators). Reported per step: engine step time plain vs
constrained, the time spent filling the batch's token bitmask (xgrammar, CPU) and applying it to the logits
(sampler), their share of the constrained step, and the decode throughput lost. On CUDA the fill runs while
the GPU computes the forward pass, so throughput_loss (not the fill's share) is what it costs; the timers
synchronize the device around the apply, which the engine itself never does.

With --libs, also compares the grammar libraries on the tokenizer: schema compile time and per-step bitmask
fill time at each batch size for xgrammar and llguidance (if installed).

    python -m load_tests.bench_grammar                                  # CPU, tiny model, SmolLM2 tokenizer
    python -m load_tests.bench_grammar --device cuda --shape llama3-8b  # GPU (bf16 random weights)
    python -m load_tests.bench_grammar --libs --out grammar.json

--tokenizer smollm2 (default where the embedded model is installed) puts SmolLM2's 49k-token tokenizer on the
model (a random-weight model only needs ids; a realistic vocabulary is what makes masks cost what they cost);
--tokenizer model keeps the model's own.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import replicas.engine.sampler as sampler_mod
from replicas.engine.protocol import GenerationRequest, SamplingParams, StructuredOutput

LONG_SCHEMA = {
    "type": "array", "minItems": 200,
    "items": {"type": "object", "additionalProperties": False, "required": ["id", "name", "ok"],
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                             "name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}}},
}
LIB_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 150},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                   "ok": {"type": "boolean"}},
}
LIB_TEXT = '{"name": "Alice Smith", "age": 31, "tags": ["a", "b"], "ok": true}'
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Wraps a function, accumulating its wall time (CUDA-synchronized around it when `device` is a GPU)."""

    def __init__(self, fn, device: torch.device | None = None):
        self.fn, self.device, self.total, self.calls = fn, device, 0.0, 0

    def __call__(self, *a, **kw):
        if self.device is not None:
            _sync(self.device)
        t = time.perf_counter()
        out = self.fn(*a, **kw)
        if self.device is not None:
            _sync(self.device)
        self.total += time.perf_counter() - t
        self.calls += 1
        return out


def model_dir(args, work: Path) -> Path:
    from load_tests.bench_engine import build_model_dir

    ns = argparse.Namespace(shape=args.shape, model=args.model, device=args.device, tiny_hidden=args.tiny_hidden,
                            tiny_layers=args.tiny_layers)
    if args.tokenizer == "model":
        return build_model_dir(ns, work)
    src = Path(args.tokenizer)
    if args.tokenizer == "smollm2":
        from replicas.engine.model_prep import prepare_embedded_model
        src = Path(prepare_embedded_model())
    if args.model == "tiny" and not args.shape:  # its vocabulary is the tokenizer's
        from transformers import AutoTokenizer

        from load_tests.tiny_model import build_tiny_model
        return build_tiny_model(work / "tiny", hidden=args.tiny_hidden, layers=args.tiny_layers,
                                num_heads=args.tiny_hidden // 16, num_kv_heads=args.tiny_hidden // 32,
                                tokenizer=AutoTokenizer.from_pretrained(str(src)))
    path = build_model_dir(ns, work)
    if path.resolve() == src.resolve():
        return path
    dst = work / "with-tokenizer"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(path, dst)
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def bench_engine(path: Path, args) -> list[dict]:
    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine

    batches = args.batch
    steps = args.steps
    engine = LLMEngine(EngineConfig(model=str(path), device=args.device, max_num_seqs=max(batches),
                                    max_num_batched_tokens=max(2048, max(batches) * (args.prompt_len + 1)),
                                    num_kv_blocks=args.kv_blocks, block_size=16, warmup=args.device == "cuda"))
    device = engine.runner.device
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(LONG_SCHEMA))
    grammars = engine.grammars  # the tokenizer's vocabulary tables: once per replica, not per schema
    t = time.perf_counter()
    grammars.compile(spec)
    compile_ms = (time.perf_counter() - t) * 1e3
    fill = engine.grammars.bitmask = _Timer(engine.grammars.bitmask)
    apply = sampler_mod.apply_token_bitmask = _Timer(sampler_mod.apply_token_bitmask, device)
    rows = []
    g = torch.Generator().manual_seed(0)
    for B in batches:
        result = {"batch": B, "steps": steps, "compile_ms": round(compile_ms, 2)}
        for mode in ("plain", "grammar"):
            reqs = [GenerationRequest(
                request_id=f"{mode}-{B}-{i}",
                prompt_token_ids=torch.randint(10, 400, (args.prompt_len,), generator=g).tolist(),
                sampling=SamplingParams(max_tokens=steps + args.warm_steps + 4, temperature=0.7, seed=i,
                                        ignore_eos=True, structured=spec if mode == "grammar" else None))
                for i in range(B)]
            for r in reqs:
                engine.add_request(r)
            while any(c.seq.num_output_tokens == 0 for s in engine.requests.values() for c in s.choices):
                engine.step()  # prefills
            for _ in range(args.warm_steps):
                engine.step()
            fill.total = apply.total = 0.0
            fill.calls = apply.calls = 0
            times = []
            for _ in range(steps):
                _sync(device)
                t = time.perf_counter()
                engine.step()  # the sampled tokens reach the host inside the step: the step is complete
                times.append(time.perf_counter() - t)
            for r in reqs:
                engine.abort_request(r.request_id)
            ms = statistics.median(times) * 1e3
            result[f"{mode}_step_ms"] = round(ms, 3)
            if mode == "grammar":
                result["fill_ms"] = round(fill.total / max(fill.calls, 1) * 1e3, 3)
                result["apply_ms"] = round(apply.total / max(apply.calls, 1) * 1e3, 3)
        g_ms, p_ms = result["grammar_step_ms"], result["plain_step_ms"]
        result["mask_share_of_step"] = round((result["fill_ms"] + result["apply_ms"]) / g_ms, 4)
        result["throughput_loss"] = round(1 - p_ms / g_ms, 4)
        rows.append(result)
        print(f"B={B:3d}: step plain {p_ms:8.2f} ms, constrained {g_ms:8.2f} ms | mask fill {result['fill_ms']:.3f} ms"
              f" + apply {result['apply_ms']:.3f} ms = {result['mask_share_of_step']:.1%} of the step; "
              f"throughput -{result['throughput_loss']:.1%}", flush=True)
    engine.shutdown()
    return rows


def bench_libs(path: Path, batches: list[int]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = len(tok)
    ids = tok.encode(LIB_TEXT, add_special_tokens=False)
    out: dict = {"vocab": vocab, "tokens": len(ids)}

    import xgrammar as xgr

    from replicas.engine.grammar import json_string_chars_fixed
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    setup = time.perf_counter() - t
    comp = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    t = time.perf_counter()
    cg = comp.compile_grammar(json_string_chars_fixed(str(xgr.Grammar.from_json_schema(json.dumps(LIB_SCHEMA),
                                                                                         any_whitespace=False))))
    res = {"tokenizer_setup_ms": round(setup * 1e3, 1), "compile_ms": round((time.perf_counter() - t) * 1e3, 2)}
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    for B in batches:
        ms = [xgr.GrammarMatcher(cg) for _ in range(B)]
        mask = xgr.allocate_token_bitmask(B, vocab)
        ts = []
        for tkn in ids:
            t = time.perf_counter()
            ms[0].fill_next_token_bitmask(mask, 0) if B == 1 else batch.batch_fill_next_token_bitmask(ms, mask)
            ts.append(time.perf_counter() - t)
            for m in ms:
                assert m.accept_token(tkn)
        res[f"fill_ms_b{B}"] = round(statistics.mean(ts) * 1e3, 3)
    out["xgrammar"] = res

    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        out["llguidance"] = "not installed"
        return out
    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(LIB_SCHEMA, defaults={
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    llguidance.LLMatcher(lt, grammar)
    res = {"tokenizer_setup_ms": round(setup * 1e3, 1), "compile_ms": round((time.perf_counter() - t) * 1e3, 2)}
    ex = llguidance.LLExecutor(num_threads=2)
    for B in batches:
        ms = [llguidance.LLMatcher(lt, grammar) for _ in range(B)]
        mask = llguidance.torch.allocate_token_bitmask(B, vocab)
        ts = []
        for tkn in ids:
            t = time.perf_counter()
            if B == 1:
                llguidance.torch.fill_next_token_bitmask(ms[0], mask, 0)
            else:
                llguidance.torch.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], mask)
            ts.append(time.perf_counter() - t)
            for m in ms:
                assert m.consume_token(tkn), m.get_error()
        res[f"fill_ms_b{B}"] = round(statistics.mean(ts) * 1e3, 3)
    out["llguidance"] = res
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | path to a HF model directory")
    ap.add_argument("--shape", help="a random-weight model of this shape (load_tests.bench_engine.SHAPES)")
    ap.add_argument("--tokenizer", default="smollm2", help="smollm2 | model | path to a tokenizer directory")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch and mode")
    ap.add_argument("--warm-steps", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--tiny-hidden", type=int, default=256)
    ap.add_argument("--tiny-layers", type=int, default=4)
    ap.add_argument("--libs", action="store_true", help="also compare xgrammar and llguidance")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, Path(tmp))
        result = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                  "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "model": args.shape or args.model, "tokenizer": args.tokenizer,
                  "engine": bench_engine(path, args)}
        if args.libs:
            result["libs"] = bench_libs(path, args.batch)
            print(json.dumps(result["libs"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
