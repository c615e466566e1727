"""GPU paths of the model families (run on a CUDA machine; skipped with a reason elsewhere): the Triton
paged-attention kernel with a sliding window and soft-capping against the CPU reference in float64, the grouped
MoE GEMMs in bf16 against the reference loop, and the engine on GPU (Triton attention, CUDA graphs, grouped MoE,
longrope regimes in the graph buckets) against transformers' greedy output, fp32."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.paged_metadata import build_step_tensors
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window,softcap", [(4096, 0.0), (64, 0.0), (17, 50.0), (0, 50.0)])
def test_triton_kernel_window_and_softcap_match_reference(window, softcap, dtype, splits):
    from replicas.engine.kernels.paged_attention import paged_attention as triton_attention
    g = torch.Generator().manual_seed(window + int(softcap))
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 16
    # decodes at several contexts, a fresh prefill longer than the small windows, a chunk over a cached prefix
    shapes = [(5, 1), (300, 1), (4500, 1), (0, 200), (700, 40)]
    need = [-(-(s + n) // block_size) for s, n in shapes]
    perm = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used:used + nb])
        used += nb
    starts, lengths = [s for s, _ in shapes], [n for _, n in shapes]
    t, dev = sum(lengths), torch.device("cuda")
    k_cache = torch.randn(sum(need) + 3, block_size, kv_heads, head_dim, generator=g).to(dev, dtype)
    v_cache = torch.randn_like(k_cache)
    q = (torch.randn(t, heads, head_dim, generator=g) * 4).to(dev, dtype)
    scale = head_dim ** -0.5
    _, _, meta = build_step_tensors(tables, starts, lengths, block_size, heads // kv_heads, dev)
    meta.num_splits = splits
    out = torch.full_like(q, float("nan"))
    triton_attention(q, k_cache, v_cache, meta, scale, out=out, window=window, softcap=softcap)
    torch.cuda.synchronize()
    ref_meta = AttentionMetadata.build(tables, starts, lengths, block_size, torch.device("cpu"),
                                       windows=(0, window) if window else (0,))
    kc, vc = k_cache.double().cpu(), v_cache.double().cpu()
    kf = kc.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    vf = vc.view(-1, kv_heads, head_dim)[ref_meta.slot_mapping]
    ref = paged_attention(q.double().cpu(), kf, vf, kc, vc, ref_meta, scale, window=window, softcap=softcap)
    assert not out.isnan().any(), "rows left unwritten"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_grouped_moe_bf16_matches_reference(tokens):
    from replicas.engine.models import moe
    g = torch.Generator().manual_seed(tokens)
    experts, top_k, hidden, inter = 8, 2, 1024, 512
    dev = torch.device("cuda")
    x = torch.randn(tokens, hidden, generator=g).to(dev, torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dev, torch.bfloat16)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dev, torch.bfloat16)
    weights, ids = torch.topk(torch.randn(tokens, experts, generator=g).softmax(-1), top_k)
    weights, ids = weights.to(dev, torch.bfloat16), ids.to(dev)
    out = moe.experts_grouped(x, w13, w2, weights, ids, torch.nn.functional.silu)
    ref = moe.experts_reference(x.float(), w13.float(), w2.float(), weights.float(), ids, torch.nn.functional.silu)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


@pytest.mark.parametrize("family", ["mistral-window", "gemma2", "gemma3", "phi4-mini-longrope", "mixtral",
                                    "qwen2-moe"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_gpu_engine_families_equal_transformers(family, enforce_eager, tmp_path):
    """fp32 on GPU: staggered arrivals (decode buckets, mixed steps), prompts past the window (8) and past
    longrope's original context (32), chunked prefill and prefix hits."""
    from load_tests.tiny_model import build_family_model
    model_dir = build_family_model(tmp_path / family, family)
    engine = make_engine(model_dir, device="cuda", dtype="float32", block_size=16, num_kv_blocks=64,
                         max_num_seqs=16, max_num_batched_tokens=32, enforce_eager=enforce_eager)
    prefix = random_prompts(1, engine.vocab_size, 20, 20, seed=5)[0]
    prompts = random_prompts(6, engine.vocab_size, 1, 60, seed=6) + \
        random_prompts(4, engine.vocab_size, 1, 8, seed=7, prefix=prefix)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 3, []).append(request(i, p, greedy(12)))
    chunks = run_all(engine, arrivals)
    hf = HFReference(model_dir)
    for i, p in enumerate(prompts):
        assert tokens_of(chunks[str(i)]) == hf.generate(p, 12), f"prompt {i} (len {len(p)}) diverged"


def test_moe_bench_runs_decode_workload_and_peer(tmp_path):
    """The MoE benchmark entry end to end at 2 layers and 8 requests: floor of the active experts, our decode
    and workload, transformers' generate and continuous batching on the same weights."""
    from load_tests.bench_gpu import main
    res = main(["--shape", "qwen3-30b-a3b", "--layers", "2", "-n", "8", "--max-num-seqs", "8",
                "--sections", "decode,workload,peer", "--model-dir", str(tmp_path / "m"), "--out-dir",
                str(tmp_path / "out")])
    assert res["layers"] == 2 and 0 < res["floor_active_ms_per_token"] < res["floor_ms_per_token"]
    assert res["decode"]["x_floor_active"] > 1 and res["workload"]["output_tok_per_s"] > 0
    assert res["peer"]["generate_bs1_ms_per_token"] > 0
