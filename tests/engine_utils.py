"""Helpers shared by the engine tests: build an engine on a tiny model, run requests to completion,
and the transformers greedy reference."""
from __future__ import annotations

import torch

from replicas.engine.config import EngineConfig
from replicas.engine.engine import LLMEngine
from replicas.engine.protocol import GenerationRequest, SamplingParams


def make_engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    kw.setdefault("device", "cpu")
    hooks = {k: kw.pop(k) for k in ("on_blocks_stored", "on_blocks_evicted") if k in kw}
    return LLMEngine(EngineConfig(model=str(model_dir), **kw), **hooks)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def request(rid, prompt, sampling=None, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=str(rid), prompt_token_ids=list(prompt), sampling=sampling or greedy(8), **kw)


def run_all(engine: LLMEngine, arrivals: dict[int, list[GenerationRequest]] | list[GenerationRequest],
            max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle, adding arrivals[k] before step k. Returns request id -> its chunks."""
    if isinstance(arrivals, list):
        arrivals = {0: arrivals}
    chunks: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for req in arrivals.get(step, []):
            engine.add_request(req)
            chunks[req.request_id] = []
        for c in engine.step():
            chunks[c.request_id].append(c)
        step += 1
        assert step < max_steps, "engine did not finish"
    return chunks


def tokens_of(chunks, index: int = 0) -> list[int]:
    return [t for c in chunks if c.index == index for t in c.token_ids]


def text_of(chunks, index: int = 0) -> str:
    return "".join(c.text for c in chunks if c.index == index)


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0, prefix: list[int] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(list(prefix) + torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


class HFReference:
    """transformers generate(), greedy, fp32: the correctness reference."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        return out[0, len(prompt):].tolist()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()
