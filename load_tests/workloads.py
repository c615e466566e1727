"""Seeded workload generators: typed request specs (chat messages or a prompt, max_tokens, arrival
time, session) for multi-turn chat with shared system prompts, ShareGPT-like length mixes, long
context, and time-varying arrivals (bursts, ramps) for autoscaling runs.

Everything here is pure and deterministic for a seed; `load_tests.client` sends the specs.

Lengths are counted in words drawn from a small vocabulary of short English words: each is about
one token in the byte-level BPE tokenizers we serve, so "tokens" below means "about one token".
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Stands in for an earlier turn's answer until the client substitutes the real one.
PLACEHOLDER_ANSWER = "(previous answer)"

_VOCAB = (
    "the of and to in is it that was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much go good new "
    "write our used me man too any day same right look think also around another came come work "
    "three word must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might "
    "next sound below saw something thought both few those always looked show large often together "
    "asked house world going want school important until form food keep children feet land side "
    "without boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following picture "
    "being study second eyes soon times story boys since white days ever paper hard near sentence"
).split()


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    # Set on an assistant message that stands for an earlier turn's answer: the client replaces
    # `content` with what request `answer_of` really returned (kept when that request failed).
    answer_of: str | None = None


class RequestSpec(BaseModel):
    """One request to send. Exactly one of `messages` (chat API) or `prompt` (completions API)."""
    model_config = ConfigDict(extra="forbid")

    id: str
    session_id: str
    turn: int = 0
    messages: list[Message] | None = None
    prompt: str | None = None
    max_tokens: int = Field(ge=1)
    arrival_s: float = Field(0.0, ge=0.0)  # earliest send time from run start; open loop only
    after: str | None = None  # previous turn of the session: sent only once it has finished
    think_time_s: float = Field(0.0, ge=0.0)  # pause after `after` finishes
    extra_body: dict = Field(default_factory=dict)  # merged into the request body

    @model_validator(mode="after")
    def _one_input(self) -> "RequestSpec":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a request spec needs exactly one of messages or prompt")
        return self


class RatePhase(BaseModel):
    """A stretch of time whose arrival rate moves linearly from start_rate to end_rate (req/s)."""
    model_config = ConfigDict(extra="forbid")

    duration_s: float = Field(gt=0.0)
    start_rate: float = Field(ge=0.0)
    end_rate: float | None = Field(None, ge=0.0)  # None -> constant start_rate

    @property
    def rate_end(self) -> float:
        return self.start_rate if self.end_rate is None else self.end_rate


class Arrival(BaseModel):
    """How requests (first turns, for multi-turn) arrive.

    poisson / fixed_rate: open loop at `rate`, or following `phases` (then the workload ends with
    the last phase). closed_loop: `concurrency` requests in flight, the next sent when one ends.
    """
    model_config = ConfigDict(extra="forbid")

    kind: Literal["poisson", "fixed_rate", "closed_loop"] = "closed_loop"
    rate: float | None = Field(None, gt=0.0)
    phases: list[RatePhase] | None = None
    concurrency: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "Arrival":
        if self.kind != "closed_loop" and self.rate is None and not self.phases:
            raise ValueError(f"{self.kind} arrivals need a rate or phases")
        return self

    @property
    def offered_load(self) -> float:
        """The x of a throughput-against-load plot: req/s (mean over phases) or concurrency."""
        if self.kind == "closed_loop":
            return float(self.concurrency)
        if self.phases:
            total = sum(p.duration_s for p in self.phases)
            return sum((p.start_rate + p.rate_end) / 2 * p.duration_s for p in self.phases) / total
        return float(self.rate)


def burst_phases(base_rate: float, peak_rate: float, base_s: float = 20.0, burst_s: float = 10.0,
                 bursts: int = 2) -> list[RatePhase]:
    """Quiet, burst, quiet, ...: `bursts` bursts, each between two quiet stretches."""
    phases = [RatePhase(duration_s=base_s, start_rate=base_rate)]
    for _ in range(bursts):
        phases += [RatePhase(duration_s=burst_s, start_rate=peak_rate),
                   RatePhase(duration_s=base_s, start_rate=base_rate)]
    return phases


def ramp_phases(start_rate: float, peak_rate: float, ramp_s: float = 60.0, hold_s: float = 30.0,
                down_s: float = 60.0) -> list[RatePhase]:
    """Ramp up, hold the peak, ramp down: scale-up then scale-down for an autoscaling run."""
    return [RatePhase(duration_s=ramp_s, start_rate=start_rate, end_rate=peak_rate),
            RatePhase(duration_s=hold_s, start_rate=peak_rate),
            RatePhase(duration_s=down_s, start_rate=peak_rate, end_rate=start_rate)]


def arrival_times(arrival: Arrival, n: int, rng: np.random.Generator) -> list[float]:
    """Up to n send times (s from run start). With phases, fewer when the phases end first.

    Events of a unit-rate process (exponential gaps for Poisson, evenly spaced for fixed rate) are
    mapped through the inverse cumulative rate, which gives the time-varying process exactly.
    """
    if arrival.kind == "closed_loop":
        return [0.0] * n
    if arrival.kind == "poisson":
        unit = np.cumsum(rng.exponential(1.0, size=n))
    else:
        unit = np.arange(n, dtype=float)
    if not arrival.phases:
        return [float(u) / arrival.rate for u in unit]
    times: list[float] = []
    t0, area0 = 0.0, 0.0  # start time and cumulative rate integral at the start of the phase
    events = iter(unit)
    e = next(events, None)
    for p in arrival.phases:
        a, slope = p.start_rate, (p.rate_end - p.start_rate) / p.duration_s
        area = a * p.duration_s + slope * p.duration_s ** 2 / 2
        while e is not None and e - area0 <= area:
            x = e - area0  # solve a*t + slope*t^2/2 = x for t in [0, duration]
            if abs(slope) < 1e-12:
                t = x / a if a > 0 else 0.0
            else:
                t = (-a + math.sqrt(max(a * a + 2 * slope * x, 0.0))) / slope
            times.append(t0 + min(max(t, 0.0), p.duration_s))
            e = next(events, None)
        t0, area0 = t0 + p.duration_s, area0 + area
    return times


class LengthDist(BaseModel):
    """Lognormal length (median, sigma) clipped to [min, max]; sigma 0 means always the median."""
    model_config = ConfigDict(extra="forbid")

    median: float = Field(gt=0)
    sigma: float = Field(0.0, ge=0.0)
    min: int = Field(1, ge=1)
    max: int = Field(1 << 20, ge=1)

    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        if self.sigma == 0.0:
            raw = np.full(size, self.median)
        else:
            raw = rng.lognormal(math.log(self.median), self.sigma, size=size)
        return [int(x) for x in np.clip(np.rint(raw), self.min, self.max)]


class _WorkloadBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    arrival: Arrival = Field(default_factory=Arrival)
    # For random-weight models that stop early: ask the server (vLLM-style extension) to run to max_tokens.
    ignore_eos: bool = False

    def _extra(self) -> dict:
        return {"ignore_eos": True} if self.ignore_eos else {}


class MultiTurnConfig(_WorkloadBase):
    """Conversations of `turns` turns; each turn resends the whole history plus new user text, so
    prefixes grow. round(sharing_ratio * conversations) conversations share the pool of
    `system_prompts` system prompts (assigned round robin); the others get a system prompt of their own."""
    kind: Literal["multiturn"] = "multiturn"
    conversations: int = Field(32, ge=1)
    turns: int = Field(4, ge=1)
    system_prompts: int = Field(4, ge=1)
    sharing_ratio: float = Field(0.75, ge=0.0, le=1.0)
    system_prompt_tokens: int = Field(512, ge=1)
    user_tokens: LengthDist = Field(default_factory=lambda: LengthDist(median=48, sigma=0.5, min=8, max=256))
    max_tokens: int = Field(64, ge=1)
    think_time_s: float = Field(0.0, ge=0.0)


class ShareGPTConfig(_WorkloadBase):
    """Single-turn requests with lognormal input/output lengths, a rough fit of ShareGPT's shape
    (long tails, output about as long as input)."""
    kind: Literal["sharegpt"] = "sharegpt"
    requests: int = Field(100, ge=1)
    input_tokens: LengthDist = Field(default_factory=lambda: LengthDist(median=180, sigma=1.0, min=4, max=2048))
    output_tokens: LengthDist = Field(default_factory=lambda: LengthDist(median=150, sigma=0.9, min=1, max=1024))
    api: Literal["chat", "completions"] = "chat"


class LongContextConfig(_WorkloadBase):
    """Several questions about each of a few long documents (document first, so the questions on
    one document share its prefix); requests come in shuffled order."""
    kind: Literal["long_context"] = "long_context"
    documents: int = Field(4, ge=1)
    document_tokens: int = Field(3000, ge=1)
    questions_per_document: int = Field(4, ge=1)
    question_tokens: int = Field(24, ge=1)
    max_tokens: int = Field(32, ge=1)


WorkloadConfig = Annotated[Union[MultiTurnConfig, ShareGPTConfig, LongContextConfig], Field(discriminator="kind")]


class Workload(BaseModel):
    config: WorkloadConfig
    requests: list[RequestSpec]  # session-major, turns in order: any prefix of it is self-contained


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(_VOCAB[i] for i in rng.integers(0, len(_VOCAB), size=n))


def _multiturn(cfg: MultiTurnConfig, rng: np.random.Generator) -> list[RequestSpec]:
    pool = [f"You are assistant {i}. " + _words(rng, cfg.system_prompt_tokens) for i in range(cfg.system_prompts)]
    shared = set(rng.permutation(cfg.conversations)[: round(cfg.sharing_ratio * cfg.conversations)].tolist())
    starts = arrival_times(cfg.arrival, cfg.conversations, rng)
    specs, next_pool = [], 0
    for c, start in enumerate(starts):
        if c in shared:
            system, next_pool = pool[next_pool % len(pool)], next_pool + 1
        else:
            system = f"You are a private assistant for conversation {c}. " + _words(rng, cfg.system_prompt_tokens)
        history = [Message(role="system", content=system)]
        prev = None
        for t, n_user in enumerate(cfg.user_tokens.sample(rng, cfg.turns)):
            history = history + [Message(role="user", content=_words(rng, n_user))]
            rid = f"c{c}-t{t}"
            specs.append(RequestSpec(id=rid, session_id=f"c{c}", turn=t, messages=history, max_tokens=cfg.max_tokens,
                                     arrival_s=start, after=prev, think_time_s=cfg.think_time_s if prev else 0.0,
                                     extra_body=cfg._extra()))
            history = history + [Message(role="assistant", content=PLACEHOLDER_ANSWER, answer_of=rid)]
            prev = rid
    return specs


def _sharegpt(cfg: ShareGPTConfig, rng: np.random.Generator) -> list[RequestSpec]:
    ins = cfg.input_tokens.sample(rng, cfg.requests)
    outs = cfg.output_tokens.sample(rng, cfg.requests)
    times = arrival_times(cfg.arrival, cfg.requests, rng)
    specs = []
    for i, t in enumerate(times):
        text = _words(rng, ins[i])
        io = {"prompt": text} if cfg.api == "completions" else {"messages": [Message(role="user", content=text)]}
        specs.append(RequestSpec(id=f"r{i}", session_id=f"r{i}", max_tokens=outs[i], arrival_s=t,
                                 extra_body=cfg._extra(), **io))
    return specs


def _long_context(cfg: LongContextConfig, rng: np.random.Generator) -> list[RequestSpec]:
    docs = [_words(rng, cfg.document_tokens) for _ in range(cfg.documents)]
    pairs = [(d, q) for d in range(cfg.documents) for q in range(cfg.questions_per_document)]
    order = rng.permutation(len(pairs))
    times = arrival_times(cfg.arrival, len(pairs), rng)
    specs = []
    for t, k in zip(times, order):
        d, q = pairs[k]
        content = f"Document:\n{docs[d]}\n\nQuestion {q}: {_words(rng, cfg.question_tokens)}?"
        specs.append(RequestSpec(id=f"d{d}-q{q}", session_id=f"d{d}", messages=[Message(role="user", content=content)],
                                 max_tokens=cfg.max_tokens, arrival_s=t, extra_body=cfg._extra()))
    return specs


_GENERATORS = {"multiturn": _multiturn, "sharegpt": _sharegpt, "long_context": _long_context}


def generate(cfg: MultiTurnConfig | ShareGPTConfig | LongContextConfig) -> Workload:
    """The workload for `cfg`: the same specs for the same config and seed."""
    rng = np.random.default_rng(cfg.seed)
    return Workload(config=cfg, requests=_GENERATORS[cfg.kind](cfg, rng))


PRESETS = ("multiturn", "sharegpt", "long_context", "burst", "ramp")


def preset(name: str, *, requests: int | None = None, seed: int = 0, arrival: Arrival | None = None,
           ignore_eos: bool = False) -> MultiTurnConfig | ShareGPTConfig | LongContextConfig:
    """A named standard workload sized for about `requests` requests. burst and ramp are ShareGPT
    content on time-varying Poisson arrivals (their phases set the length; `requests` caps it)."""
    common = {"seed": seed, "ignore_eos": ignore_eos}
    if arrival is not None:
        common["arrival"] = arrival
    if name == "multiturn":
        turns = MultiTurnConfig.model_fields["turns"].default
        return MultiTurnConfig(conversations=max(1, math.ceil((requests or 128) / turns)), **common)
    if name == "sharegpt":
        return ShareGPTConfig(requests=requests or 100, **common)
    if name == "long_context":
        per_doc = LongContextConfig.model_fields["questions_per_document"].default
        return LongContextConfig(documents=max(1, math.ceil((requests or 16) / per_doc)), **common)
    if name in ("burst", "ramp"):
        if arrival is not None:
            raise ValueError(f"{name} brings its own arrival phases")
        phases = burst_phases(1.0, 8.0) if name == "burst" else ramp_phases(0.5, 8.0)
        common["arrival"] = Arrival(kind="poisson", phases=phases)
        return ShareGPTConfig(requests=requests or 2000, **common)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(PRESETS)}")
