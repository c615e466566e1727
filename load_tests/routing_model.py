"""What a routing benchmark's prefix hit rates can be, from its workload alone.

The workload's requests, tokenized as the replicas see them, are replayed in the closed loop's order
(every conversation's turn 1, then every turn 2, ...) through one LRU block cache per replica, sized as
the benchmark sizes them, under two choices:
- affinity: each conversation stays on one home replica (homes dealt round robin). Nothing a router
  can do caches more of this workload while the caches hold it: this is its ceiling.
- random: a uniformly random replica per request. pow2's pick (the less loaded of two random replicas)
  ignores what they hold, so as far as the cache goes it is this.
The quotient of the two is the hit-rate ratio against pow2 that any cache-aware router can reach here:
with N replicas a random pick lands on the conversation's latest holder one time in N, and the copies of
shorter prefixes it left on other replicas add hits of their own.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from replicas.engine.hashing import block_hashes


@dataclass(frozen=True)
class Request:
    session: str
    prompt: list[int]  # token ids the replica prefills
    answer: list[int]  # token ids it generates

    @property
    def cached_after(self) -> list[int]:
        """Token ids whose full blocks the replica holds after answering: the block holding the answer's
        last token is not cached, as in the engine (its KV is never computed)."""
        return self.prompt + self.answer[:-1]


@dataclass(frozen=True)
class HitRates:
    affinity: float
    random: float

    @property
    def ratio(self) -> float:
        return self.affinity / self.random if self.random else float("inf")


def requests_of(wl, tokenizer) -> list[Request]:
    """The workload's requests in closed-loop order, each answer taken as max_tokens words of the workload's
    vocabulary (one token each with the benchmark's model, whose answers round-trip through the chat
    template)."""
    from load_tests.workloads import PLACEHOLDER_ANSWER, _words
    rng = np.random.default_rng(0)
    answers: dict[str, str] = {}
    out = []
    for spec in sorted(wl.requests, key=lambda s: s.turn):  # stable: workload order within a turn
        msgs = [{"role": m.role, "content": answers[m.answer_of] if m.content == PLACEHOLDER_ANSWER else m.content}
                for m in spec.messages]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        answers[spec.id] = _words(rng, spec.max_tokens)
        answer = tokenizer.encode(answers[spec.id], add_special_tokens=False)
        out.append(Request(spec.session_id, prompt, answer))
    return out


def working_set_blocks(requests: list[Request], block_size: int) -> int:
    """KV blocks that hold every conversation's final context (last prompt + its answer) at once."""
    last = {r.session: r for r in requests}  # turn by turn: the last one wins
    return sum(-(-(len(r.prompt) + len(r.answer)) // block_size) for r in last.values())


def replay(requests: list[Request], choose, replicas: int, capacity_blocks: int, block_size: int) -> float:
    """Prompt tokens served from cache over prompt tokens, with `choose(i, request) -> replica`. As the
    engine does, a lookup leaves at least the prompt's last token to compute."""
    caches = [OrderedDict() for _ in range(replicas)]
    hit = total = 0
    for i, req in enumerate(requests):
        cache = caches[choose(i, req)]
        cached = 0
        for h in block_hashes(req.prompt[:(len(req.prompt) - 1) // block_size * block_size], block_size):
            if h not in cache:
                break
            cached += 1
        hit += cached * block_size
        total += len(req.prompt)
        for h in block_hashes(req.cached_after, block_size):
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hit / total if total else 0.0


def hit_rates(requests: list[Request], replicas: int, capacity_blocks: int, block_size: int,
              seed: int = 0) -> HitRates:
    homes: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    picks = rng.integers(replicas, size=len(requests))
    return HitRates(
        affinity=replay(requests, lambda i, r: homes.setdefault(r.session, len(homes) % replicas),
                        replicas, capacity_blocks, block_size),
        random=replay(requests, lambda i, r: int(picks[i]), replicas, capacity_blocks, block_size))
