"""Sequence: one choice of one request as the scheduler and block manager see it — its tokens, how many
of them have KV in the cache, and the blocks holding them."""
from __future__ import annotations

import enum
import itertools

from replicas.engine.protocol import SamplingParams

_arrivals = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("request_id", "index", "token_ids", "prompt_token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "block_table", "block_hashes", "num_hashed_blocks", "status", "params", "priority", "arrival",
                 "num_cached_tokens", "waiting_prefill", "hash_extra", "grammar")

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 *, priority: int = 0, output_token_ids: list[int] = (), prompt_block_hashes: list[int] = (),
                 arrival: int | None = None, hash_extra: bytes | None = None):
        self.request_id = request_id
        self.index = index  # choice index in [0, n)
        self.token_ids = list(prompt_token_ids) + list(output_token_ids)
        self.prompt_token_ids = prompt_token_ids  # shared by a request's choices; read per step by the sampler
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or is being written this step)
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of token_ids, extended lazily by the block manager.
        self.block_hashes: list[int] = list(prompt_block_hashes)
        self.num_hashed_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.status = SequenceStatus.WAITING
        self.params = params
        self.priority = priority
        self.arrival = next(_arrivals) if arrival is None else arrival
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.waiting_prefill = 0  # while waiting: tokens it will compute once admitted (Scheduler.add)
        # The block-hash extra key (model id + cache salt, hashing.extra_key); None: the block manager's.
        self.hash_extra = hash_extra
        self.grammar = None  # structured output: the choice's grammar matcher (replicas.engine.grammar)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower priority value first, then arrival (FCFS), then choice index."""
        return (self.priority, self.arrival, self.index)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
