"""The MoE block's two expert paths agree (the reference loop, and the grouped-GEMM path the GPU runs, which
torch also runs on CPU), routing follows each family's normalisation, and the engine's greedy tokens equal
transformers' through the grouped path too."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.models import moe
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 2), (37, 8, 3), (5, 16, 4)])
def test_grouped_experts_equal_reference(tokens, experts, top_k):
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 32, 24
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    ref = moe.experts_reference(x, w13, w2, weights, ids, torch.nn.functional.silu)
    out = moe.experts_grouped(x, w13, w2, weights, ids, torch.nn.functional.silu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Dense check of the reference: every token's weighted sum over its own experts.
    e, k = ids[0, 0].item(), weights[0, 0]
    gate, up = (x[:1] @ w13[e].T).chunk(2, -1)
    first = k * (torch.nn.functional.silu(gate) * up) @ w2[e].T
    for j in range(1, top_k):
        e = ids[0, j].item()
        gate, up = (x[:1] @ w13[e].T).chunk(2, -1)
        first = first + weights[0, j] * (torch.nn.functional.silu(gate) * up) @ w2[e].T
    torch.testing.assert_close(ref[:1], first, rtol=1e-5, atol=1e-5)


def test_routing_normalisation_per_family(tmp_path):
    from load_tests.tiny_model import build_family_model
    from replicas.engine.models import CausalLM, ModelArgs
    for family, renorm in (("mixtral", True), ("qwen2-moe", False), ("qwen3-moe", True)):
        args = ModelArgs.from_dir(build_family_model(tmp_path / family, family, layers=1))
        block = CausalLM(args).model.layers[0].ffn
        assert isinstance(block, moe.SparseMoE) and block.renormalize is renorm
        torch.nn.init.normal_(block.gate.weight)
        weights, ids = block.route(torch.randn(6, args.hidden_size))
        assert ids.shape == (6, args.num_experts_per_tok)
        sums = weights.sum(-1)
        assert torch.allclose(sums, torch.ones(6)) if renorm else bool((sums < 1).all())
    qwen2 = ModelArgs.from_dir(tmp_path / "qwen2-moe")
    assert qwen2.shared_expert_intermediate_size == 48 and qwen2.moe_layers == (True,)


@pytest.mark.parametrize("family", ["qwen2-moe"])
def test_engine_grouped_path_matches_transformers(family, tmp_path, monkeypatch):
    from load_tests.tiny_model import build_family_model
    monkeypatch.setattr(moe, "_GROUPED", True)
    model_dir = build_family_model(tmp_path / family, family)
    engine = make_engine(model_dir, max_num_batched_tokens=16)
    prompts = random_prompts(3, engine.vocab_size, 2, 30, seed=9)
    chunks = run_all(engine, [request(i, p, greedy(8)) for i, p in enumerate(prompts)])
    hf = HFReference(model_dir)
    for i, p in enumerate(prompts):
        assert tokens_of(chunks[str(i)]) == hf.generate(p, 8)
