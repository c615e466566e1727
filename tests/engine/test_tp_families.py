"""Tensor parallel (tp_size=2 on CPU, gloo) for the families whose weights shard differently: MoE experts split
along their intermediate dim with one all-reduce per block (Mixtral; Qwen2-MoE with its shared expert), Phi-3's
fused qkv/gate_up checkpoint tensors read part by part, with a sliding window. Greedy
tokens equal transformers generate()."""
from __future__ import annotations

import pytest

from load_tests.tiny_model import build_family_model
from replicas.engine.model_runner import StepInputs
from replicas.engine.parallel import pack_step, unpack_step
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = pytest.mark.timeout(300)


def test_step_message_carries_longrope_regimes():
    step = StepInputs(token_ids=[5, 6, 7], starts=[9, 0], lengths=[1, 2], block_tables=[[4, 2, 7], [1]],
                      sample_rows=[0, 2], long_rope=[1, 0])
    assert unpack_step(pack_step(step)) == step


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "phi3-window"])
def test_tp2_matches_transformers(family, tmp_path):
    model_dir = build_family_model(tmp_path / family, family)
    engine = make_engine(model_dir, tp_size=2, num_kv_blocks=256, max_num_batched_tokens=16)
    try:
        prompts = random_prompts(3, engine.vocab_size, 3, 30, seed=4)
        arrivals: dict[int, list] = {}
        for i, p in enumerate(prompts):
            arrivals.setdefault(i // 2, []).append(request(i, p, greedy(8)))
        chunks = run_all(engine, arrivals)
        hf = HFReference(model_dir)
        for i, p in enumerate(prompts):
            assert tokens_of(chunks[str(i)]) == hf.generate(p, 8), f"prompt {i} diverged"
    finally:
        engine.shutdown()
