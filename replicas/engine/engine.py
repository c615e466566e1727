"""LLMEngine: the synchronous step loop of one replica — validate and admit requests, schedule, run the
model, sample, detokenize, apply stop conditions, and stream GenerationChunks out.

A request fans out into n Sequences (choices) that share the prompt's blocks through the prefix cache.
Failover resume tokens are appended to each choice as already generated output and replayed through
the detokenizer and stop checker, so streamed text continues exactly where the previous replica left off.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from replicas.engine.block_manager import BlockManager
from replicas.engine.config import EngineConfig
from replicas.engine.detokenizer import IncrementalDetokenizer, StopChecker, token_texts
from replicas.engine.hashing import extra_key
from replicas.engine.model_runner import ModelRunner
from replicas.engine.models import ModelArgs, TPInfo
from replicas.engine.parallel import ProcessWorkers, TPWorkers
from replicas.engine.protocol import (
    EngineError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    Usage,
)
from replicas.engine.sampler import Sampler, SamplingBatch
from replicas.engine.scheduler import Scheduler
from replicas.engine.sequence import Sequence

log = logging.getLogger(__name__)

BlockHook = Callable[[list[int]], None]


@dataclass
class _Choice:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    done: bool = False


@dataclass
class _Request:
    req: GenerationRequest
    choices: list[_Choice]
    unfinished: int

    def usage(self) -> Usage:
        # completion_tokens includes failover resume tokens: the client received them as output.
        return Usage(prompt_tokens=len(self.req.prompt_token_ids),
                     completion_tokens=sum(c.seq.num_output_tokens for c in self.choices),
                     cached_prompt_tokens=max(0, self.choices[0].seq.num_cached_tokens))


class LLMEngine:
    def __init__(self, config: EngineConfig, *, on_blocks_stored: BlockHook | None = None,
                 on_blocks_evicted: BlockHook | None = None, tp_group=None,
                 tp_workers: type[TPWorkers] | None = None):
        """`on_blocks_stored` / `on_blocks_evicted`: called on the engine thread with the block hashes cached or
        evicted by each step (the replica's KV event publisher). tp_size > 1: `tp_workers` starts and drives
        ranks 1..tp-1 (None: `ProcessWorkers`, local processes; the Serve replica injects Ray actors), unless
        `tp_group` is given (ranks managed by the caller)."""
        self.config = config
        model_dir = Path(config.model)
        args = self.model_args = ModelArgs.from_dir(model_dir)
        if config.max_model_len and config.max_model_len > args.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"{args.max_position_embeddings} positions")
        self.max_model_len = config.max_model_len or args.max_position_embeddings
        self.model_id = config.served_model_id
        self.block_size = config.block_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = args.vocab_size
        self.eos_token_ids = _eos_ids(model_dir, args, self.tokenizer)
        self.workers = None  # TP: rank 0's handle on the worker ranks (this process is rank 0)
        if tp_group is not None:  # ranks managed by the caller
            self.runner = ModelRunner(config, args, TPInfo(dist.get_rank(tp_group), dist.get_world_size(tp_group),
                                                           tp_group))
        elif config.tp_size > 1:
            self.workers = (tp_workers or ProcessWorkers)(config)
            self.runner = self.workers.make_runner(args)
        else:
            self.runner = ModelRunner(config, args)
        self.on_blocks_stored = on_blocks_stored
        self.on_blocks_evicted = on_blocks_evicted
        self.requests: dict[str, _Request] = {}
        self._grammars = None  # GrammarCompiler, made on the first structured-output request
        self._grammars_lock = threading.Lock()
        self._fresh_state()
        if config.warmup:
            try:
                self.warm_up()
            except BaseException:
                self.shutdown()  # TP: no worker rank outlives an engine that failed to start
                raise

    # ------------------------------------------------------------------ warm-up

    def warm_up(self) -> None:
        """Run throwaway requests through the paths a request takes: a prefill of a full token budget and a
        chunked remainder, a prefix-cache hit, decode at every batch size up to max_num_seqs and the sampler's
        stages. Triton kernels compile, cuBLAS and lazily loaded CUDA modules load and the allocator grows
        here, not in the first client's request (seconds on a GPU otherwise). Leaves nothing behind: no block
        cached or in use, no KV event published (the hooks are off meanwhile), counters and the sampler's
        generator as freshly built."""
        hooks = self.on_blocks_stored, self.on_blocks_evicted
        self.on_blocks_stored = self.on_blocks_evicted = None
        t0 = time.perf_counter()
        num_requests = 0
        try:
            for phase in self._warmup_phases():
                for req in phase:
                    self.add_request(req)
                num_requests += len(phase)
                for _ in range(100_000):
                    if not self.has_unfinished():
                        break
                    self.step()
                    if self.failures:
                        rid, exc = self.failures[0]
                        if rid == "warmup-structured":  # optional: the engine serves without it
                            log.warning("engine warm-up: structured output failed (%r); the first structured "
                                        "request will load the grammar tables", exc)
                            self.failures.clear()
                            continue
                        raise RuntimeError(f"engine warm-up request {rid} failed: {exc!r}") from exc
                else:
                    raise RuntimeError("engine warm-up did not finish")
            steps = self.num_steps
        finally:
            self.on_blocks_stored, self.on_blocks_evicted = hooks
            for rid in list(self.requests):  # left only by a failure
                self.abort_request(rid)
            self._fresh_state()
        log.info("engine warm-up: %d requests, %d steps in %.2fs", num_requests, steps, time.perf_counter() - t0)

    def _warmup_phases(self) -> list[list[GenerationRequest]]:
        """Request batches, run one after another, sized to this engine's pool and context.

        GPU: the attention kernel compiles one variant per query tiling (16 or 64 rows) and key-range split count
        (1 to 16, from the step's programs and longest context), the fused kernels per token-count class, and
        steps past the CUDA graphs' sizes run eagerly. So: a long prefill (full-budget chunks, then a remainder
        that is neither a graph's size nor a multiple of 16), then a context sweep, single requests over a cached
        prefix of 0 to 4096 tokens whose 300- and 600-token prefills and batch-1 decodes take each tiling at
        each split count. CPU: nothing compiles; a short prompt and a few small batches, all in one batch (the
        prefix hit finds blocks cached earlier in the same step), so a few steps suffice."""
        cfg, bs = self.config, self.block_size
        gpu = self.runner.device.type == "cuda"
        pool = self.block_manager.num_blocks
        cap = min(self.max_model_len, pool * bs)  # tokens one sequence can hold

        def tokens(n: int, salt: int) -> list[int]:
            return [(salt * 1_000_003 + 7919 * i + 11) % self.vocab_size for i in range(n)]

        def req(name: str, prompt: list[int], max_tokens: int, **sampling) -> GenerationRequest:
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **{"temperature": 0.0, **sampling})
            return GenerationRequest(request_id=f"warmup-{name}", prompt_token_ids=prompt, sampling=sp)

        phases = []
        long = tokens(min(max(cfg.max_num_batched_tokens, 4096) + 300 if gpu else 2 * bs + 1, cap - 2), 0)
        if not long:
            return []
        phases.append([req("prefill", long, 2)])
        # A prefix hit: the cached full blocks of that prompt, then a short new tail.
        cached = (len(long) - 1) // bs * bs
        if cached:
            hit = long[:cached] + tokens(2, 1)
            if len(hit) + 2 <= cap:
                phases.append([req("prefix-hit", hit, 2)])
        if gpu:
            for context in (0, 256, 512, 1024, 2048, 4096):
                prefix = long[:context // bs * bs]
                for new in (300, 600):
                    if context <= cached and len(prefix) + new + 2 <= cap:
                        phases.append([req(f"context-{context}-{new}", prefix + tokens(new, context + new), 2)])
        # Decode: request i stops after i + 1 tokens, so the batch shrinks through every size; the sampler's
        # stages (seeded, so the engine's generator is not drawn from) and logprobs ride along.
        samplings = [{}, {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1},
                     {"temperature": 1.0, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
                      "frequency_penalty": 0.1, "seed": 2}, {"logprobs": 2}]
        batch, blocks = [], 0
        for i in range(min(cfg.max_num_seqs, 64 if gpu else len(samplings))):
            prompt, out = tokens(bs + 1, 2 + i), i + 1
            blocks += self.block_manager.blocks_needed(len(prompt) + out)
            if blocks > pool or len(prompt) + out > self.max_model_len:
                break
            batch.append(req(f"decode-{i}", prompt, out, **samplings[i % len(samplings)]))
        if batch:
            phases.append(batch)
        phases = phases if gpu else [[r for phase in phases for r in phase]]
        # Last and alone: the grammar library loads its tokenizer tables here, not in the first structured
        # request; a tokenizer it cannot constrain fails this row only (see warm_up).
        if len(prompt := tokens(bs + 1, 1)) + 2 <= cap:
            phases.append([req("structured", prompt, 2, structured=StructuredOutput(kind="json_object"))])
        return phases

    def _fresh_state(self) -> None:
        """An empty pool and prefix cache, no queued work, zero counters, the sampler's generator at its seed."""
        cfg = self.config
        self.block_manager = BlockManager(self.runner.num_kv_blocks, cfg.block_size,
                                          enable_prefix_caching=cfg.enable_prefix_caching,
                                          extra_key=extra_key(self.model_id),
                                          uncached_past=self.model_args.longrope_original,
                                          window=self.model_args.sliding_window
                                          if self.model_args.all_layers_slide else 0)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens)
        self.sampler = Sampler(cfg.seed)
        self.failures: list[tuple[str, BaseException]] = []
        self.num_steps = 0
        self.num_computed_tokens = 0
        self.last_step_unix: float | None = None
        if getattr(self.runner, "graphs", None) is not None:
            self.runner.graphs.replays = dict.fromkeys(self.runner.graphs.replays, 0)

    # ------------------------------------------------------------------ requests

    @property
    def grammars(self):
        """The structured-output compiler for this tokenizer (thread-safe: the replica compiles off the loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                from replicas.engine.grammar import GrammarCompiler
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._grammars

    def add_request(self, req: GenerationRequest) -> None:
        self._validate(req)
        sp = req.sampling
        prompt = req.prompt_token_ids
        hashes = req.block_hashes if req.block_hashes and len(req.block_hashes) == len(prompt) // self.block_size \
            else []
        choices = []
        arrival = None
        salt = extra_key(self.model_id, req.cache_salt) if req.cache_salt else None
        for i in range(sp.n):
            resume = req.resume_token_ids[i] if req.resume_token_ids else []
            seq = Sequence(req.request_id, i, prompt, sp, priority=req.priority, output_token_ids=resume,
                           prompt_block_hashes=hashes, arrival=arrival, hash_extra=salt)
            if sp.structured is not None:  # a failover resume continues in the grammar state it left
                seq.grammar = self.grammars.matcher(sp.structured, resume)
            arrival = seq.arrival  # choices of one request arrive together
            detok = IncrementalDetokenizer(self.tokenizer, prompt)
            stop = StopChecker(sp.stop, sp.include_stop_str_in_output)
            if resume:  # replay what the client already has, so held-back text and stop prefixes carry over
                stop.push(detok.append(resume))
            choices.append(_Choice(seq, detok, stop))
        self.requests[req.request_id] = _Request(req, choices, sp.n)
        for c in choices:
            self.scheduler.add(c.seq)

    def _validate(self, req: GenerationRequest) -> None:
        if req.request_id in self.requests:
            raise EngineError(f"request id {req.request_id!r} is already running")
        sp = req.sampling
        ids = req.prompt_token_ids
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {self.vocab_size})")
        total = len(ids) + sp.max_tokens
        if total > self.max_model_len:
            raise EngineError(f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) = {total} exceeds "
                              f"the model's context length {self.max_model_len}")
        if self.block_manager.blocks_held(total, self.config.max_num_batched_tokens) > self.block_manager.num_blocks:
            raise EngineError(f"prompt + max_tokens = {total} tokens needs more KV blocks than this replica has "
                              f"({self.block_manager.num_blocks} x {self.block_size} tokens)")
        named = list(sp.logit_bias or ()) + sp.stop_token_ids
        if named and (min(named) < 0 or max(named) >= self.vocab_size):
            raise EngineError(f"logit_bias and stop_token_ids must name token ids in [0, {self.vocab_size})")
        for resume in req.resume_token_ids or []:
            if len(resume) >= sp.max_tokens:
                raise EngineError("resume_token_ids already reach max_tokens: nothing left to generate")
            if resume and (min(resume) < 0 or max(resume) >= self.vocab_size):
                raise EngineError(f"resume token ids must be in [0, {self.vocab_size})")

    def abort_request(self, request_id: str) -> list[GenerationChunk]:
        """Stop a request and free its blocks now. Returns its closing chunks (finish_reason "abort",
        usage on the last); empty when the request is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for c in state.choices:
            self.scheduler.finish(c.seq)
        open_choices = [c for c in state.choices if not c.done]
        chunks = [GenerationChunk(request_id=request_id, index=c.seq.index, finish_reason="abort")
                  for c in open_choices]
        if chunks:
            chunks[-1].usage = state.usage()
        return chunks

    def _fail(self, request_id: str, exc: BaseException) -> None:
        """Drop a request after an error, forgetting any cache entries it wrote (they may be garbage)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        for c in state.choices:
            self.scheduler.finish(c.seq, uncache=True)
        self.failures.append((request_id, exc))

    def take_failures(self) -> list[tuple[str, BaseException]]:
        """Requests that failed since the last call (they produce no more chunks)."""
        out, self.failures = self.failures, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[GenerationChunk]:
        batch = self.scheduler.schedule()
        chunks: list[GenerationChunk] = []
        if batch:
            self.num_steps += 1
            self.last_step_unix = time.time()
            try:
                with torch.inference_mode():  # the sampler edits the logits in place
                    seqs, logits = self.runner.run(batch.seqs, batch.num_tokens)
                    for seq, n in zip(batch.seqs, batch.num_tokens):
                        seq.num_computed_tokens += n
                    self.num_computed_tokens += sum(batch.num_tokens)
                    if seqs:
                        rows = [(s.params, s.prompt_token_ids, s.output_token_ids, s.index) for s in seqs]
                        allowed = None
                        # Filled on the CPU while a GPU still runs the forward just launched (nothing has
                        # synchronized yet): the fill hides behind the step.
                        if any(s.grammar is not None for s in seqs):
                            allowed = self.grammars.bitmask([s.grammar for s in seqs])
                        out = self.sampler(logits, SamplingBatch.build(rows, logits.device, allowed))
            except Exception as exc:  # the whole batch's requests fail; the engine keeps serving
                log.exception("engine step failed; failing %d sequences", len(batch.seqs))
                for rid in {s.request_id for s in batch.seqs}:
                    self._fail(rid, exc)
                seqs = []
            if seqs:
                chunks = self._postprocess(seqs, out.token_ids, out.logprobs)
        self._publish_block_events()
        return chunks

    def _postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs) -> list[GenerationChunk]:
        chunks = []
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            state = self.requests.get(seq.request_id)
            if state is None:  # another choice of this request failed earlier in this loop
                continue
            try:
                chunk = self._append_token(state, state.choices[seq.index], tok,
                                           logprobs[i] if logprobs else None)
            except Exception as exc:
                log.exception("request %s failed while appending a token", seq.request_id)
                self._fail(seq.request_id, exc)
                continue
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                self.scheduler.finish(seq)
                state.unfinished -= 1
                if state.unfinished == 0:
                    del self.requests[seq.request_id]
                    chunk.usage = state.usage()
        return chunks

    def _append_token(self, state: _Request, choice: _Choice, tok: int, lp) -> GenerationChunk:
        seq, sp = choice.seq, state.req.sampling
        seq.token_ids.append(tok)
        finish = None
        grammar_done = False
        if seq.grammar is not None and not seq.grammar.terminated:
            if not seq.grammar.accept(tok):  # the mask allowed it: a bug, not the client's
                raise RuntimeError(f"token {tok} was sampled outside the response format's grammar")
            grammar_done = seq.grammar.terminated  # only a stop token ends a complete grammar
        if tok in sp.stop_token_ids or (tok in self.eos_token_ids and (not sp.ignore_eos or grammar_done)):
            finish, text = "stop", ""  # the stop token's own text is not output
        else:
            text = choice.stop.push(choice.detok.append([tok]))
            if choice.stop.stopped:
                finish = "stop"
            elif seq.num_output_tokens >= sp.max_tokens:
                finish = "length"
        if finish is not None and not choice.stop.stopped:
            text += choice.stop.push(choice.detok.flush())
            text += choice.stop.flush()
        choice.done = finish is not None
        original = self.model_args.longrope_original
        if original and finish is None and seq.num_tokens == original + 1:
            # longrope: past the pretrained context every position rotates with the long factors, so the
            # KV computed so far (short factors) is recomputed, as transformers' Phi-3 generate() does.
            self.scheduler.recompute(seq)
        chunk = GenerationChunk(request_id=seq.request_id, index=seq.index, text=text, token_ids=[tok],
                                finish_reason=finish)
        if lp is not None:
            ids = [tok] + [t for t, _ in lp.top]
            texts = token_texts(self.tokenizer, ids)
            chunk.logprobs = [TokenLogprob(token_id=tok, token=texts[0], logprob=lp.logprob,
                                           top=[(t, s, v) for (t, v), s in zip(lp.top, texts[1:])])]
        return chunk

    def _publish_block_events(self) -> None:
        stored, evicted = self.block_manager.drain_events()
        for hook, hashes in ((self.on_blocks_evicted, evicted), (self.on_blocks_stored, stored)):
            if hook is not None and hashes:
                try:
                    hook(hashes)
                except Exception:  # a subscriber's bug must not stop serving
                    log.exception("block event hook failed")

    def cached_block_hashes(self) -> list[int]:
        """Hashes of every block in the prefix cache now (the KV publisher's resync snapshot). Safe off the
        engine thread: list() of an int-keyed dict runs in C under the GIL, so it never sees the dict mid-change."""
        return list(self.block_manager.cached)

    def check_workers(self, timeout_s: float) -> None:
        """TP: raise if a worker rank is dead or silent, or a step failed (LLMReplica.check_health)."""
        if self.workers is not None:
            self.workers.check(timeout_s)

    def shutdown(self) -> None:
        """TP: stop the worker ranks and leave the process groups (nothing to do otherwise)."""
        if self.workers is not None:
            self.workers.shutdown()

    # ------------------------------------------------------------------ introspection

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        return EngineStats(
            num_waiting=len(sch.waiting), num_running=len(sch.running),
            pending_prefill_tokens=sch.pending_prefill_tokens(), kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks, kv_usage=1.0 - bm.num_free_blocks / bm.num_blocks,
            prefix_query_tokens=bm.prefix_query_tokens, prefix_hit_tokens=bm.prefix_hit_tokens,
            num_preemptions=sch.num_preemptions, computed_tokens=self.num_computed_tokens, steps=self.num_steps,
            last_step_unix=self.last_step_unix)


def _eos_ids(model_dir: Path, args: ModelArgs, tokenizer) -> frozenset[int]:
    ids = set(args.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
