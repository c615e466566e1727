"""Sampler: one engine step's [B, V] logits -> next token per row (and logprobs), batched.

Owns the sampling semantics: repetition penalty (HF), presence/frequency penalties (OpenAI),
temperature, top-k, top-p, min-p, greedy, and position-addressable seeded draws. Everything runs as
batched tensor ops on the logits' device; the only host sync is the one copy that fetches the result.

Order, as HF/vLLM: repetition penalty -> frequency/presence -> temperature -> top-k -> top-p -> min-p
-> draw. Greedy rows (temperature 0) take the argmax after the penalties.

Seeded draws use the exponential race: token = argmax(p / E) with E ~ Exp(1) i.i.d., which picks
token i with probability p_i. A seeded row's E comes from a generator seeded by xxh64(seed, choice
index, output position), so the draw at position p is the same whatever else is in the batch, on
whichever replica (of the same device type: CUDA's generator streams differ from the CPU's, and may
differ between GPU models) the request resumes after a failover.

Logprobs are log_softmax of the raw model logits, before penalties, temperature and filters: what
OpenAI and vLLM report by default.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Sequence

import torch
import xxhash

from replicas.protocol import SamplingParams

_U64 = (1 << 64) - 1


def seed_for(seed: int, choice_index: int, position: int) -> int:
    """The generator seed of one draw: a stable mix of (request seed, choice index, output position)."""
    return xxhash.xxh64_intdigest(struct.pack("<QQQ", seed & _U64, choice_index & _U64, position & _U64))


SamplingRow = tuple[SamplingParams, Sequence[int], Sequence[int], int]  # params, prompt, output, index


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling state of one step, as device tensors. Build it with `SamplingBatch.build`.

    Optional tensors are None when no row needs them, so the sampler skips that stage entirely.
    """
    size: int
    greedy_only: bool  # every row greedy, no penalties: plain argmax
    greedy: torch.Tensor | None  # bool [B]; None when no row is greedy
    temperature: torch.Tensor | None  # [B, 1], greedy rows hold 1.0; None when all rows are greedy
    top_k: torch.Tensor | None  # long [B, 1], rows without top-k hold max_top_k
    top_k_on: torch.Tensor | None  # bool [B, 1]
    max_top_k: int
    top_p: torch.Tensor | None  # [B, 1]
    min_p: torch.Tensor | None  # [B, 1]
    repetition: torch.Tensor | None  # [B, 1]
    presence: torch.Tensor | None  # [B, 1]
    frequency: torch.Tensor | None  # [B, 1]
    # Token history for the penalties, right-padded with id 0 and weight 0 so scatter_add ignores pads.
    seen_ids: torch.Tensor | None  # long [B, Ls]: prompt + output of rows with a repetition penalty
    seen_w: torch.Tensor | None  # [B, Ls]
    out_ids: torch.Tensor | None  # long [B, Lo]: output of rows with a presence/frequency penalty
    out_w: torch.Tensor | None  # [B, Lo]
    seeded: list[tuple[int, int]]  # (row, generator seed) for sampled rows with a request seed
    logprobs: list[int | None]  # per row: top-k alternatives wanted (0: chosen only), None: off
    max_logprobs: int  # -1 when no row wants logprobs

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], device: torch.device | str = "cpu") -> "SamplingBatch":
        """rows: (params, prompt_ids, output_ids, choice_index) per sequence, in logits row order.

        output_ids holds every output token so far, failover resume tokens included: it gives the
        output position of this step's draw and the counts for the penalties.
        """
        ps = [r[0] for r in rows]
        n = len(ps)
        greedy = [p.temperature == 0.0 for p in ps]
        rep = [p.repetition_penalty != 1.0 for p in ps]
        pres_freq = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in ps]
        any_penalty = any(rep) or any(pres_freq)
        logprobs = [p.logprobs for p in ps]
        max_logprobs = max((k for k in logprobs if k is not None), default=-1)
        sampled = [i for i in range(n) if not greedy[i]]

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype).view(n, 1).to(device, non_blocking=True)

        b = cls(size=n, greedy_only=not sampled and not any_penalty,
                greedy=None, temperature=None, top_k=None, top_k_on=None, max_top_k=0, top_p=None,
                min_p=None, repetition=None, presence=None, frequency=None, seen_ids=None, seen_w=None,
                out_ids=None, out_w=None, seeded=[], logprobs=logprobs, max_logprobs=max_logprobs)
        if sampled:
            if any(greedy):
                b.greedy = col(greedy, torch.bool).view(n)
            b.temperature = col([1.0 if g else p.temperature for g, p in zip(greedy, ps)])
            ks = [p.top_k if p.top_k > 0 and not greedy[i] else 0 for i, p in enumerate(ps)]
            if any(ks):
                b.max_top_k = max(ks)
                b.top_k = col([k or b.max_top_k for k in ks], torch.long)
                b.top_k_on = col([k > 0 for k in ks], torch.bool)
            if any(p.top_p < 1.0 and not greedy[i] for i, p in enumerate(ps)):
                b.top_p = col([p.top_p for p in ps])
            if any(p.min_p > 0.0 and not greedy[i] for i, p in enumerate(ps)):
                b.min_p = col([p.min_p for p in ps])
            b.seeded = [(i, seed_for(ps[i].seed, r[3], len(r[2]))) for i, r in enumerate(rows)
                        if not greedy[i] and ps[i].seed is not None]
        if any(rep):
            b.repetition = col([p.repetition_penalty for p in ps])
            b.seen_ids, b.seen_w = _padded([list(r[1]) + list(r[2]) if rep[i] else []
                                            for i, r in enumerate(rows)], device)
        if any(pres_freq):
            b.presence = col([p.presence_penalty for p in ps])
            b.frequency = col([p.frequency_penalty for p in ps])
            b.out_ids, b.out_w = _padded([r[2] if pres_freq[i] else [] for i, r in enumerate(rows)], device)
        return b


def _padded(seqs: list[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    w = torch.zeros(len(seqs), width, dtype=torch.float32)
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            w[i, :len(s)] = 1.0
    return ids.to(device, non_blocking=True), w.to(device, non_blocking=True)


@dataclass(slots=True)
class RowLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; empty when k = 0


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None] | None = None  # per row when any row asked, else None


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens, then frequency/presence on output tokens. In place."""
    B, V = logits.shape
    if b.repetition is not None:
        seen = torch.zeros(B, V, device=logits.device).scatter_add_(1, b.seen_ids, b.seen_w) > 0
        penalized = torch.where(logits > 0, logits / b.repetition, logits * b.repetition)
        logits = torch.where(seen, penalized, logits, out=logits)
    if b.out_ids is not None:
        counts = torch.zeros(B, V, device=logits.device).scatter_add_(1, b.out_ids, b.out_w)
        logits -= b.frequency * counts + b.presence * (counts > 0)
    return logits


def apply_filters(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p as -inf masks (HF warper semantics). In place."""
    if b.temperature is None:
        return logits
    logits.div_(b.temperature)
    V = logits.shape[1]
    if b.top_p is not None:
        # One sort serves top-k and top-p.
        srt, idx = logits.sort(dim=-1, descending=True)
        if b.top_k is not None:
            kth = srt.gather(1, b.top_k.clamp(max=V) - 1)
            srt.masked_fill_(b.top_k_on & (srt < kth), -math.inf)
        probs = srt.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= b.top_p
        drop[:, 0] = False
        srt.masked_fill_(drop, -math.inf)
        logits.scatter_(1, idx, srt)
    elif b.top_k is not None:
        kth = logits.topk(min(b.max_top_k, V), dim=-1).values.gather(1, b.top_k.clamp(max=V) - 1)
        logits.masked_fill_(b.top_k_on & (logits < kth), -math.inf)
    if b.min_p is not None:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); min_p = 0 gives -inf: no-op.
        floor = logits.max(dim=-1, keepdim=True).values + b.min_p.log()
        logits.masked_fill_(logits < floor, -math.inf)
    return logits


class Sampler:
    """Stateless apart from the generators: the global one for unseeded rows (seeded from the engine
    seed) and a scratch one per device re-seeded for each seeded row."""

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._global: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[torch.device, torch.Generator] = {}

    def _generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        if device not in self._global:
            self._global[device] = torch.Generator(device=device).manual_seed(self._seed)
            self._scratch[device] = torch.Generator(device=device)
        return self._global[device], self._scratch[device]

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        """Sample one token per row. `logits` [B, V] fp32 is consumed: it is modified in place."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if b.max_logprobs >= 0 else None
        if b.greedy_only:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, b)
        if raw_logprobs is None:
            return SamplerOutput(token_ids=tokens.tolist())
        return _with_logprobs(tokens, raw_logprobs, b)

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        logits = apply_penalties(logits, b)
        if b.temperature is None:  # every row greedy, with penalties
            return logits.argmax(dim=-1)
        greedy_tokens = logits.argmax(dim=-1) if b.greedy is not None else None
        probs = apply_filters(logits, b).softmax(dim=-1)
        glob, scratch = self._generators(logits.device)
        noise = torch.empty_like(probs).exponential_(generator=glob)
        for row, seed in b.seeded:
            noise[row].exponential_(generator=scratch.manual_seed(seed))
        tokens = probs.div_(noise).argmax(dim=-1)
        if greedy_tokens is not None:
            tokens = torch.where(b.greedy, greedy_tokens, tokens)
        return tokens


def _with_logprobs(tokens: torch.Tensor, logprobs: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    chosen = logprobs.gather(1, tokens.view(-1, 1))
    parts = [tokens.view(-1, 1).double(), chosen.double()]
    k = b.max_logprobs
    if k > 0:
        top = logprobs.topk(k, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    # One device->host copy for everything: float64 holds token ids exactly and fp32 logprobs losslessly.
    host = torch.cat(parts, dim=1).cpu().tolist()
    token_ids, rows = [], []
    for want, r in zip(b.logprobs, host):
        token_ids.append(int(r[0]))
        if want is None:
            rows.append(None)
            continue
        rows.append(RowLogprobs(logprob=r[1], top=[(int(i), v) for i, v in zip(r[2:2 + want], r[2 + k:2 + k + want])]))
    return SamplerOutput(token_ids=token_ids, logprobs=rows)
