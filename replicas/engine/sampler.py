"""Sampler: one engine step's [B, V] logits -> next token per row (and logprobs), batched.

Owns the sampling semantics: repetition penalty (HF), presence/frequency penalties (OpenAI),
temperature, top-k, top-p, min-p, greedy, and position-addressable seeded draws. Everything runs as
batched tensor ops on the logits' device; on CUDA the only host sync is the one copy that fetches
the result.

Order, as HF/vLLM: the structured-output token bitmask (disallowed tokens -> -inf, for every row that has a
grammar) and logit_bias first, then repetition penalty -> frequency/presence -> temperature -> top-k -> top-p -> min-p
-> draw. Greedy rows (temperature 0) take the argmax after the penalties.

The draw is inverse-CDF: token = first i with cdf_i > u * cdf_V, one uniform u per row. A seeded
row's u is a pure function of xxh64(seed, choice index, output position), so the draw at position p
is the same whatever else is in the batch, on whichever replica (CPU or GPU) the request resumes
after a failover. Unseeded rows take u from the sampler's generator. (An exponential race needs V
random numbers per row; CPU torch makes those ~100x slower than a softmax.)

Logprobs are log_softmax of the raw model logits, before penalties, temperature and filters: what
OpenAI and vLLM report by default.
"""
from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass
from typing import Sequence

import torch
import xxhash

from replicas.engine.protocol import SamplingParams

_U64 = (1 << 64) - 1
# CPU top-p: torch's CPU sort is very slow, so try the best few tokens first (see _top_k_top_p).
_CPU_TOP_P_CANDIDATES = 1024


def seed_for(seed: int, choice_index: int, position: int) -> int:
    """A stable 64-bit mix of (request seed, choice index, output position)."""
    return xxhash.xxh64_intdigest(struct.pack("<QQQ", seed & _U64, choice_index & _U64, position & _U64))


def uniform_for(seed: int, choice_index: int, position: int) -> float:
    """The seeded draw's uniform in [0, 1): 24 bits, exact in fp32 (like torch.rand)."""
    return (seed_for(seed, choice_index, position) >> 40) * 2.0 ** -24


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
    top_p_on: torch.Tensor | None  # bool [B, 1]: top_p < 1 (rows at 1.0 must not lose a rounding tail)
    top_p_beyond_k: bool  # some top-p row has no top-k: its nucleus may reach past max_top_k
    min_p: torch.Tensor | None  # [B, 1]
    repetition: torch.Tensor | None  # [B, 1]
    presence: torch.Tensor | None  # [B, 1]
    frequency: torch.Tensor | None  # [B, 1]
    # Token history for the penalties, flat: (row, token id) pairs.
    seen: tuple[torch.Tensor, torch.Tensor] | None  # prompt + output of rows with a repetition penalty
    out: tuple[torch.Tensor, torch.Tensor] | None  # output of rows with a presence/frequency penalty
    seeded: torch.Tensor | None  # bool [B]: rows whose uniform comes from their request seed
    seeded_u: torch.Tensor | None  # [B]
    logprobs: list[int | None]  # per row: top-k alternatives wanted (0: chosen only), None: off
    max_logprobs: int  # -1 when no row wants logprobs
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logit_bias: flat (row, token id, bias)
    # Structured output: (rows with a grammar: long [R], int32 [B, ceil(V/32)] bitmask of allowed tokens, bit
    # t%32 of word t//32, meaningful in those rows); None when no row has one.
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], device: torch.device | str = "cpu",
              allowed: tuple[list[int], torch.Tensor] | None = None) -> "SamplingBatch":
        """`allowed`: (constrained rows, their [B, W] bitmask) from replicas.engine.grammar."""
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
        sampled = not all(greedy)

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype).view(n, 1).to(device, non_blocking=True)

        b = cls(size=n, greedy_only=not sampled and not any_penalty,
                greedy=None, temperature=None, top_k=None, top_k_on=None, max_top_k=0, top_p=None,
                top_p_on=None, top_p_beyond_k=False, min_p=None, repetition=None, presence=None,
                frequency=None, seen=None, out=None, seeded=None,
                seeded_u=None, logprobs=logprobs, max_logprobs=max_logprobs)
        if allowed is not None and allowed[0]:
            b.allowed = (torch.tensor(allowed[0]).to(device, non_blocking=True),
                         allowed[1].to(device, non_blocking=True))
        if any(p.logit_bias for p in ps):
            brow, btok, bval = [], [], []
            for i, p in enumerate(ps):
                for tok, v in (p.logit_bias or {}).items():
                    brow.append(i)
                    btok.append(tok)
                    bval.append(v)
            b.bias = (torch.tensor(brow).to(device, non_blocking=True),
                      torch.tensor(btok).to(device, non_blocking=True),
                      torch.tensor(bval, dtype=torch.float32).to(device, non_blocking=True))
        if sampled:
            if any(greedy):
                b.greedy = col(greedy, torch.bool).view(n)
            b.temperature = col([1.0 if g else p.temperature for g, p in zip(greedy, ps)])
            ks = [p.top_k if p.top_k > 0 and not g else 0 for g, p in zip(greedy, ps)]
            if any(ks):
                b.max_top_k = max(ks)
                b.top_k = col([k or b.max_top_k for k in ks], torch.long)
                b.top_k_on = col([k > 0 for k in ks], torch.bool)
            tp = [p.top_p < 1.0 and not g for g, p in zip(greedy, ps)]
            if any(tp):
                b.top_p = col([p.top_p for p in ps])
                b.top_p_on = col(tp, torch.bool)
                b.top_p_beyond_k = any(on and not k for on, k in zip(tp, ks))
            if any(p.min_p > 0.0 and not g for g, p in zip(greedy, ps)):
                b.min_p = col([p.min_p for p in ps])
            seeded = [not g and p.seed is not None for g, p in zip(greedy, ps)]
            if any(seeded):
                b.seeded = col(seeded, torch.bool).view(n)
                b.seeded_u = col([uniform_for(r[0].seed, r[3], len(r[2])) if s else 0.0
                                  for s, r in zip(seeded, rows)]).view(n)
        if any(rep):
            b.repetition = col([p.repetition_penalty for p in ps])
            b.seen = _flat_history([(r[1], r[2]) if rep[i] else () for i, r in enumerate(rows)], device)
        if any(pres_freq):
            b.presence = col([p.presence_penalty for p in ps])
            b.frequency = col([p.frequency_penalty for p in ps])
            b.out = _flat_history([(r[2],) if pres_freq[i] else () for i, r in enumerate(rows)], device)
        return b


def _flat_history(parts: list[tuple[Sequence[int], ...]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every listed token, as two flat long tensors on `device`."""
    ids, lens = array("q"), []
    for seqs in parts:
        n = 0
        for seq in seqs:
            ids.extend(seq)  # C-speed; torch.tensor(list) is ~4x slower on long prompts
            n += len(seq)
        lens.append(n)
    tok = torch.frombuffer(ids, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
    tok = tok.to(device, non_blocking=True)
    # output_size spares repeat_interleave a device->host sync.
    row = torch.repeat_interleave(torch.arange(len(lens), device=device),
                                  torch.tensor(lens).to(device, non_blocking=True), output_size=len(ids))
    return row, tok


@dataclass(slots=True)
class RowLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; empty when k = 0


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None] | None = None  # per row when any row asked, else None


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _disallowed_table(device: torch.device) -> torch.Tensor:
    """bool [256, 8]: entry [x, b] is True when bit b of byte x is 0 (the token is not allowed)."""
    table = _BIT_TABLES.get(device)
    if table is None:
        x = torch.arange(256).view(-1, 1)
        table = _BIT_TABLES[device] = ((x >> torch.arange(8)) & 1).eq(0).to(device)
    return table


def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf the logits of tokens whose bit is 0, in place, in `rows` (long [R]; None: every row).
    `bitmask` int32 [B, W], one row per logits row (bit t%32 of word t//32, little-endian), covers W*32 >= the
    tokenizer's tokens; columns past it (an embedding padded beyond the tokenizer) are never allowed.

    CPU: xgrammar's C++ loop (torch's multi-threaded gathers lose to it at these sizes). GPU: torch ops with no
    host sync, unpacked through a byte -> 8-bit lookup table (one gather instead of 32 shifts over int32)."""
    V = logits.shape[1]
    width = bitmask.shape[1] * 32
    if _on_cpu(logits):
        import xgrammar

        idx = None if rows is None else rows.tolist()
        if width < V:
            logits[slice(None) if idx is None else idx, width:] = -math.inf
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(V, width), indices=idx, backend="cpu")
        return logits
    if rows is not None:
        sub, bitmask = logits.index_select(0, rows), bitmask.index_select(0, rows)
    else:
        sub = logits
    masked = _disallowed_table(logits.device)[bitmask.contiguous().view(torch.uint8).long()].view(sub.shape[0], -1)
    if width >= V:
        sub.masked_fill_(masked[:, :V], -math.inf)
    else:
        sub[:, :width].masked_fill_(masked, -math.inf)
        sub[:, width:] = -math.inf
    if rows is not None:
        logits.index_copy_(0, rows, sub)
    return logits


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens, then frequency/presence on output tokens. In place."""
    B, V = logits.shape
    if b.repetition is not None:
        row, tok = b.seen
        seen = torch.zeros(B * V, dtype=torch.bool, device=logits.device).index_fill_(0, row * V + tok, True)
        penalized = torch.where(logits > 0, logits / b.repetition, logits * b.repetition)
        logits = torch.where(seen.view(B, V), penalized, logits, out=logits)
    if b.out is not None:
        row, tok = b.out
        counts = torch.zeros(B * V, device=logits.device).index_add_(
            0, row * V + tok, torch.ones(tok.shape, device=logits.device)).view(B, V)
        logits -= b.frequency * counts + b.presence * (counts > 0)
    return logits


def apply_filters(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p as -inf masks (HF warper semantics)."""
    if b.temperature is None:
        return logits
    logits.div_(b.temperature)
    if b.top_p is not None:
        logits = _top_k_top_p(logits, b)
    elif b.top_k is not None:
        V = logits.shape[1]
        kth = logits.topk(min(b.max_top_k, V), dim=-1).values.gather(1, b.top_k.clamp(max=V) - 1)
        logits.masked_fill_(b.top_k_on & (logits < kth), -math.inf)
    if b.min_p is not None:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); min_p = 0 gives -inf: no-op.
        floor = logits.max(dim=-1, keepdim=True).values + b.min_p.log()
        logits.masked_fill_(logits < floor, -math.inf)
    return logits


def _top_k_top_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Top-k then top-p, both decided on the best `width` tokens in sorted order.

    Rows with top-k need only their k best. A top-p row without top-k needs its whole nucleus: on
    GPU that means sorting the full row; on CPU, where torch's sort is ~25x slower than a top-k of
    1024 and a data-dependent branch costs no sync, try the best 1024 and sort fully only when their
    mass falls short of some row's top_p. Ties at the k-th value may be cut (HF keeps them).
    """
    V = logits.shape[1]
    width = min(b.max_top_k, V)
    if b.top_p_beyond_k:
        width = min(V, max(width, _CPU_TOP_P_CANDIDATES)) if logits.device.type == "cpu" else V
    while True:
        # Sorted, best first. A full-width topk is ~1.5x slower than sort on GPU.
        vals, idx = logits.sort(dim=-1, descending=True) if width == V else logits.topk(width, dim=-1)
        if b.top_k is not None:
            vals.masked_fill_(b.top_k_on & (vals < vals.gather(1, b.top_k.clamp(max=width) - 1)), -math.inf)
        # Candidates' probabilities under the whole row's distribution (after top-k, as in HF).
        if width < V and b.top_p_beyond_k:
            norm = logits.logsumexp(dim=-1, keepdim=True)
            if b.top_k is not None:
                norm = torch.where(b.top_k_on, vals.logsumexp(dim=-1, keepdim=True), norm)
            probs = (vals - norm).exp()
        else:  # the candidates hold every token that can survive
            probs = vals.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        if width < V and b.top_p_beyond_k:
            no_k = b.top_p_on if b.top_k is None else b.top_p_on & ~b.top_k_on
            if bool((no_k & (above[:, -1:] + probs[:, -1:] < b.top_p)).any()):
                width = V  # some nucleus reaches past the candidates
                continue
        # Drop a token when the tokens above it already hold top_p; the best one always stays.
        drop = b.top_p_on & (above >= b.top_p)
        drop[:, 0] = False
        vals.masked_fill_(drop, -math.inf)
        kept = torch.full_like(logits, -math.inf).scatter_(1, idx, vals)
        # Rows with neither filter keep every token, including those outside the candidates.
        untouched = ~b.top_p_on if b.top_k is None else ~(b.top_p_on | b.top_k_on)
        return torch.where(untouched, logits, kept)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u * total; it has mass > 0.

    Two levels, because a cumsum along a 128k-wide row runs on one block per row (~200 us for 64
    rows on an H200): pick the chunk of `chunk` tokens from the chunk masses, then the token inside
    it. fp32 rounding can leave a target just outside the masses; each level clamps its pick into the
    span of entries with mass.
    """
    B, V = probs.shape
    n_full = V // chunk
    masses = probs[:, :n_full * chunk].view(B, n_full, chunk).sum(dim=-1)
    if V % chunk:
        masses = torch.cat([masses, probs[:, n_full * chunk:].sum(dim=-1, keepdim=True)], dim=1)
    cum = masses.cumsum(dim=-1)
    target = u.view(-1, 1) * cum[:, -1:]
    j = _pick(cum, target)
    rest = target - (cum.gather(1, j) - masses.gather(1, j))  # target's offset into chunk j
    cols = j * chunk + torch.arange(chunk, device=probs.device)
    inside = probs.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0.0)
    # Rounding can make rest slightly negative: from 0, the pick is the chunk's first token with mass.
    return (j * chunk + _pick(inside.cumsum(dim=-1), rest.clamp_(min=0.0))).view(-1)


def _pick(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index whose cdf exceeds target (>= 0), capped at the last index with mass: [B, 1]."""
    i = torch.searchsorted(cdf, target.contiguous(), right=True)
    return torch.minimum(i, torch.searchsorted(cdf, cdf[:, -1:].contiguous()))


class Sampler:
    """Holds the generator of unseeded draws, seeded from the engine seed; otherwise stateless."""

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        """Sample one token per row. `logits` [B, V] fp32 is consumed: it is modified in place."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if b.max_logprobs >= 0 else None
        if b.allowed is not None:
            apply_token_bitmask(logits, b.allowed[1], b.allowed[0])
        if b.bias is not None:
            row, tok, val = b.bias
            logits.index_put_((row, tok), val, accumulate=True)
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
        u = torch.rand(b.size, device=logits.device, generator=self._generator(logits.device))
        if b.seeded is not None:
            u = torch.where(b.seeded, b.seeded_u, u)
        tokens = inverse_cdf(apply_filters(logits, b).softmax(dim=-1), u)
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
