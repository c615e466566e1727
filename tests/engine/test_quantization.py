"""Quantisation on CPU (issue 17): engine.quantization int8 / fp8 quantised at load and sharded under TP, the
quantised matmul paths against their dequantised definition, a pre-quantised FP8 checkpoint (compressed-tensors
float-quantized and the fp8 quant_method) loaded as published, refusal of other methods before anything starts,
an FP8 KV pool (twice the blocks of bf16, close to auto), and unknown values refused with the field named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from cluster.config import ConfigError, load_config
from cluster.model_check import ModelCheckError, check_engine_model, check_model_dir
from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.config import EngineConfig
from replicas.engine.models import CausalLM, ModelArgs
from replicas.engine.models.layers import TPInfo
from replicas.engine.paged_metadata import build_step_tensors
from replicas.engine.quant import QuantScheme, resolve
from replicas.engine.quant import ops as qops
from replicas.engine.weights import load_weights
from tests.engine.paged_kernel_emulation import emulate_paged_attention
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
MAX_NEW = 8


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in LINEARS)


def _copy_model(src: Path, dst: Path, tensors: dict[str, torch.Tensor], **config_changes) -> Path:
    """src's tokenizer and config (with changes) beside new weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _dequantized_model(src: Path, dst: Path, method: str, per_tensor: bool = False, tp: int = 1) -> Path:
    """The reference: the checkpoint with every linear weight replaced by its dequantised quantisation, as tp ranks
    quantise it (row-parallel weights, o_proj and down_proj, in column blocks with their own scales)."""
    t = load_file(str(src / "model.safetensors"))
    for name in [n for n in t if _is_linear(n)]:
        blocks = t[name].chunk(tp, dim=1) if name.endswith(("o_proj.weight", "down_proj.weight")) else [t[name]]
        t[name] = torch.cat([qops.dequantize_rows(*qops.quantize_rows(b, qops.STORAGE[method], per_tensor))
                             for b in blocks], dim=1)
    return _copy_model(src, dst, t)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,bad", [("quantization", "int4"), ("kv_cache_dtype", "fp16"),
                                       ("fp8_scheme", "w4a8")])
def test_unknown_value_refused_with_the_field_named(field, bad, capsys):
    with pytest.raises(ValidationError, match=field):
        EngineConfig(**{field: bad})
    with pytest.raises(ConfigError, match=f"engine.{field}"):
        load_config(overrides=[f"engine.{field}={bad}"], env={})
    from cluster.cli import main
    assert main(["serve", "--set", f"engine.{field}={bad}"]) == 2
    assert f"engine.{field}: Input should be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="engine.quantization"):
        resolve("int4")


# ---------------------------------------------------------------------------- the matmul


def test_quantize_rows_bounds_the_error_by_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, s = qops.quantize_rows(w, torch.int8)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert ((qops.dequantize_rows(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    q8, s8 = qops.quantize_rows(w, qops.FP8)
    rel = (qops.dequantize_rows(q8, s8) - w).abs() / w.abs().amax(1, keepdim=True)
    assert q8.dtype == qops.FP8 and rel.max() < 2 ** -4  # E4M3: 3 mantissa bits
    _, st = qops.quantize_rows(w, qops.FP8, per_tensor=True)
    assert torch.equal(st, st[:1].expand(48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_paths_equal_the_dequantised_matmul(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(dtype)
    w = torch.randn(32, 64, generator=g)
    bias = torch.randn(32, generator=g).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for method in ("int8", "fp8"):
        q, s = qops.quantize_rows(w, qops.STORAGE[method])
        ref = x.float() @ qops.dequantize_rows(q, s).T + bias.float()
        y = qops.linear(x, q, s, bias, w8a8=False)  # int8: _weight_int8pack_mm; fp8: upcast
        assert y.dtype == dtype and ((y.float() - ref).norm() / ref.norm()) < tol, method
    # w8a8: the activations are rounded to E4M3 per token as well
    y = qops.linear(x, q, s, bias, w8a8=True)
    xq, xs = qops.quantize_tokens(x)
    ref = (xq.float() * xs) @ qops.dequantize_rows(q, s).T + bias.float()
    assert ((y.float() - ref).norm() / ref.norm()) < tol


# ---------------------------------------------------------------------------- quantised at load


@pytest.mark.parametrize("method,cfg", [("int8", {}), ("fp8", {"fp8_scheme": "weight_only"}),
                                        ("fp8", {"fp8_scheme": "weight_only", "fp8_weight_scales": "tensor"})])
def test_load_time_quantisation_equals_transformers_on_the_dequantised_weights(tiny_model_dir, tmp_path, method,
                                                                               cfg):
    per_tensor = cfg.get("fp8_weight_scales") == "tensor"
    engine = make_engine(tiny_model_dir, quantization=method, **cfg)
    layer = engine.runner.model.model.layers[0]
    storage = qops.STORAGE[method]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert lin.weight.dtype == storage and lin.weight_scale.shape == (lin.weight.shape[0],)
    assert engine.runner.model.lm_head.weight.dtype == torch.float32  # embeddings and LM head stay
    # Exactly the quantisation of each checkpoint tensor (the fused qkv rows: q, then k, then v).
    t = load_file(str(tiny_model_dir / "model.safetensors"))
    parts = [qops.quantize_rows(t[f"model.layers.0.self_attn.{p}_proj.weight"], storage, per_tensor)
             for p in "qkv"]
    want = torch.cat([p[0] for p in parts])
    assert torch.equal(layer.self_attn.qkv_proj.weight.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(layer.self_attn.qkv_proj.weight_scale, torch.cat([p[1] for p in parts]))
    prompts = random_prompts(6, 472, 2, 40, seed=5)
    got = run_all(engine, [request(i, p, greedy(MAX_NEW)) for i, p in enumerate(prompts)])
    hf = HFReference(_dequantized_model(tiny_model_dir, tmp_path / "deq", method, per_tensor))
    for i, p in enumerate(prompts):
        assert tokens_of(got[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}"


def _rank_model(model_dir: Path, rank: int, size: int, scheme: QuantScheme) -> CausalLM:
    with qops.building(scheme):
        model = CausalLM(ModelArgs.from_dir(model_dir), TPInfo(rank, size)).eval()
    load_weights(model, model_dir)
    return model


def test_tp_shards_are_quantised_per_rank(tiny_model_dir):
    """Each rank quantises its own shard: column-parallel rows as unsharded, row-parallel scales over its columns."""
    scheme = QuantScheme("int8")
    t = load_file(str(tiny_model_dir / "model.safetensors"))
    full = _rank_model(tiny_model_dir, 0, 1, scheme).model.layers[1]
    for rank in range(2):
        layer = _rank_model(tiny_model_dir, rank, 2, scheme).model.layers[1]
        gate_up = layer.mlp.gate_up_proj
        n = gate_up.weight.shape[0] // 2  # this rank's gate rows, then its up rows
        rows = torch.cat([torch.arange(rank * n, (rank + 1) * n), full.mlp.gate_up_proj.weight.shape[0] // 2
                          + torch.arange(rank * n, (rank + 1) * n)])
        assert torch.equal(gate_up.weight, full.mlp.gate_up_proj.weight[rows])
        assert torch.equal(gate_up.weight_scale, full.mlp.gate_up_proj.weight_scale[rows])
        down = layer.mlp.down_proj
        cols = down.weight.shape[1]
        q, s = qops.quantize_rows(t["model.layers.1.mlp.down_proj.weight"][:, rank * cols:(rank + 1) * cols],
                                  torch.int8)
        assert torch.equal(down.weight, q) and torch.equal(down.weight_scale, s)


@pytest.mark.timeout(300)
def test_tp2_int8_engine_equals_transformers_on_its_dequantised_shards(tiny_model_dir, tmp_path):
    prompts = random_prompts(4, 472, 2, 40, seed=21)
    tp2 = make_engine(tiny_model_dir, tp_size=2, quantization="int8", num_kv_blocks=512)
    try:
        got = run_all(tp2, [request(i, p, greedy(MAX_NEW)) for i, p in enumerate(prompts)])
        tp2.check_workers(5.0)
    finally:
        tp2.shutdown()
    hf = HFReference(_dequantized_model(tiny_model_dir, tmp_path / "deq", "int8", tp=2))
    for i, p in enumerate(prompts):
        assert tokens_of(got[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}"


# ---------------------------------------------------------------------------- pre-quantised FP8 checkpoints


def _fp8_checkpoint(src: Path, dst: Path, layout: str) -> Path:
    """The tiny model as an FP8 checkpoint in a published layout: E4M3 linear weights with weight_scale
    (compressed-tensors: per channel [N, 1] bf16, plus input_scale; fp8 quant_method: per tensor, a scalar)."""
    t = load_file(str(src / "model.safetensors"))
    per_tensor = layout == "fp8"
    for name in [n for n in t if _is_linear(n)]:
        q, s = qops.quantize_rows(t[name], qops.FP8, per_tensor)
        t[name] = q
        base = name[:-len("weight")]
        if per_tensor:
            t[base + "weight_scale"] = s[0].clone()
        else:
            t[base + "weight_scale"] = s[:, None].to(torch.bfloat16)
            t[base + "input_scale"] = torch.tensor([0.05])
    if layout == "compressed-tensors":
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"],
                                            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                        "symmetric": True, "dynamic": False},
                                            "input_activations": {"num_bits": 8, "type": "float",
                                                                  "strategy": "tensor", "dynamic": False}}}}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    return _copy_model(src, dst, t, quantization_config=qc)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8"])
def test_fp8_checkpoint_loads_as_published(tiny_model_dir, tmp_path, layout, monkeypatch):
    ckpt = _fp8_checkpoint(tiny_model_dir, tmp_path / "fp8", layout)
    check_model_dir(ckpt)  # the launcher's early check lets it through
    published = load_file(str(ckpt / "model.safetensors"))

    def no_requantising(*a, **k):
        raise AssertionError("a published FP8 weight was quantised again")
    monkeypatch.setattr(qops, "quantize_rows", no_requantising)
    engine = make_engine(ckpt, fp8_scheme="weight_only")  # engine.quantization none: the checkpoint decides
    assert engine.runner.quant == QuantScheme("fp8", prequantized=True)
    layer = engine.runner.model.model.layers[0]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    want = torch.cat([published[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert qkv.weight.dtype == qops.FP8 and torch.equal(qkv.weight.view(torch.uint8), want.view(torch.uint8))
    scale = published["model.layers.0.mlp.down_proj.weight_scale"].float().reshape(-1)
    assert torch.equal(down.weight_scale, scale.expand(down.weight.shape[0]))
    monkeypatch.undo()
    prompts = random_prompts(6, 472, 2, 40, seed=6)
    got = run_all(engine, [request(i, p, greedy(MAX_NEW)) for i, p in enumerate(prompts)])
    # The reference: transformers on the dequantised checkpoint (fp32).
    deq = {}
    for n, v in published.items():
        if n.endswith(("weight_scale", "input_scale")):
            continue
        if v.dtype == qops.FP8:
            s = published[n + "_scale"].float().reshape(-1)
            deq[n] = qops.dequantize_rows(v, s.expand(v.shape[0]))
        else:
            deq[n] = v
    ref_dir = _copy_model(tiny_model_dir, tmp_path / "deq", deq)
    hf = HFReference(ref_dir)
    for i, p in enumerate(prompts):
        assert tokens_of(got[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}"
    # w8a8 (per-token FP8 activations): close to the same reference, not equal. The tiny model's wide weights
    # make logits of tens, so E4M3's ~3% activation rounding moves logprobs by tenths and flips near ties only.
    w8a8 = make_engine(ckpt)
    assert w8a8.runner.quant.w8a8
    lp = run_all(w8a8, [request(i, p, greedy(1, logprobs=1)) for i, p in enumerate(prompts)])
    diffs = []
    for i, p in enumerate(prompts):
        ref = hf.logits(p)[-1].log_softmax(-1)
        top = ref.topk(2)
        chunk = lp[str(i)][0]
        diffs.append(abs(chunk.logprobs[0].logprob - float(ref[chunk.token_ids[0]])))
        if top.values[0] - top.values[1] > 0.5:
            assert chunk.token_ids[0] == int(top.indices[0]), f"prompt {i}"
    assert sum(diffs) / len(diffs) < 0.4, diffs  # a wrong scale or layout is off by nats


def _dequantized_checkpoint(ckpt: Path, dst: Path) -> Path:
    published = load_file(str(ckpt / "model.safetensors"))
    deq = {}
    for n, v in published.items():
        if n.endswith(("weight_scale", "input_scale")):
            continue
        deq[n] = v
        if v.dtype == qops.FP8:
            s = published[n + "_scale"].float().reshape(-1)
            deq[n] = qops.dequantize_rows(v, s.expand(v.shape[0]))
    out = _copy_model(ckpt, dst, deq)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]  # plain weights now
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8"])
def test_fp8_checkpoint_with_fused_projections_loads_as_published(tmp_path, layout):
    """Phi-3 stores qkv_proj and gate_up_proj fused: their weight_scale (per row, or one for the fused tensor)
    splits into the parts' rows like the weight does."""
    from load_tests.tiny_model import build_family_model
    ckpt = _fp8_checkpoint(build_family_model(tmp_path / "phi3", "phi3"), tmp_path / "fp8", layout)
    published = load_file(str(ckpt / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in published
    engine = make_engine(ckpt, fp8_scheme="weight_only")
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.weight.view(torch.uint8),
                       published["model.layers.0.self_attn.qkv_proj.weight"].view(torch.uint8))
    scale = published["model.layers.0.self_attn.qkv_proj.weight_scale"].float().reshape(-1)
    assert torch.equal(qkv.weight_scale, scale.expand(qkv.weight.shape[0]))
    prompts = random_prompts(4, 472, 2, 40, seed=7)
    got = run_all(engine, [request(i, p, greedy(MAX_NEW)) for i, p in enumerate(prompts)])
    hf = HFReference(_dequantized_checkpoint(ckpt, tmp_path / "deq"))
    for i, p in enumerate(prompts):
        assert tokens_of(got[str(i)]) == hf.generate(p, MAX_NEW), f"prompt {i}"


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("qc,named", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "'awq'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "'gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "'compressed-tensors' (format 'pack-quantized')"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
])
def test_other_quantization_methods_refused_naming_the_method(tiny_model_dir, tmp_path, qc, named):
    d = _copy_model(tiny_model_dir, tmp_path / "q", load_file(str(tiny_model_dir / "model.safetensors")),
                    quantization_config=qc)
    with pytest.raises(ModelCheckError, match="quantization method") as e:
        check_model_dir(d)
    assert named in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="quantization method"):  # the replica refuses the same
        make_engine(d)


def test_int8_on_an_fp8_checkpoint_is_refused(tiny_model_dir, tmp_path):
    ckpt = _fp8_checkpoint(tiny_model_dir, tmp_path / "fp8", "fp8")
    with pytest.raises(ModelCheckError, match="engine.quantization: int8 conflicts"):
        check_engine_model(EngineConfig(model=str(ckpt), quantization="int8"))
    check_engine_model(EngineConfig(model=str(ckpt), quantization="fp8"))


# ---------------------------------------------------------------------------- FP8 KV cache


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 2), ("float32", 4)])
def test_fp8_kv_pool_holds_more_blocks(tiny_model_dir, dtype, ratio):
    kw = dict(num_kv_blocks=None, cpu_kv_cache_gib=2 ** -10, dtype=dtype, warmup=False)
    auto = make_engine(tiny_model_dir, **kw)
    fp8 = make_engine(tiny_model_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.runner.kv_cache.dtype == qops.FP8
    assert fp8.runner.kv_cache.element_size() * ratio == auto.runner.kv_cache.element_size()
    assert fp8.stats().kv_blocks_total == ratio * auto.stats().kv_blocks_total


def test_fp8_kv_greedy_output_close_to_auto(tiny_model_dir):
    """E4M3 rounds K and V by up to ~3%; the tiny model's wide weights make attention logits of tens, so that moves
    next-token logprobs by tenths (bf16 K/V: hundredths). Close: the same first token wherever auto's top-2 margin
    is clear, logprobs within tenths. A wrong scale, byte or slot would be off by nats."""
    prefix = random_prompts(1, 472, 40, 40, seed=31)[0]
    prompts = random_prompts(6, 472, 5, 60, seed=32) + random_prompts(2, 472, 3, 9, seed=33, prefix=prefix)
    # The last request arrives two steps later: its prefix blocks hit the cache (chunks over cached FP8 blocks).
    arrivals = {0: [request(i, p, greedy(1, logprobs=2)) for i, p in enumerate(prompts[:7])],
                2: [request(7, prompts[7], greedy(1, logprobs=2))]}
    fp8 = make_engine(tiny_model_dir, kv_cache_dtype="fp8")
    got = run_all(fp8, {k: [r.model_copy(deep=True) for r in v] for k, v in arrivals.items()})
    assert fp8.stats().prefix_hit_tokens > 0
    want = run_all(make_engine(tiny_model_dir), arrivals)
    diffs = []
    for i in range(len(prompts)):
        a, b = want[str(i)][0], got[str(i)][0]
        top = a.logprobs[0].top
        if top[0][2] - top[1][2] > 0.5:
            assert a.token_ids == b.token_ids, f"prompt {i}"
        lp = dict((t, v) for t, _, v in b.logprobs[0].top)
        diffs.append(abs(a.logprobs[0].logprob - lp.get(a.token_ids[0], b.logprobs[0].logprob)))
    assert sum(diffs) / len(diffs) < 0.3, diffs


def test_fp8_kv_cpu_path_and_kernel_emulation_agree():
    """The CPU path and the Triton kernel's emulation read an FP8 pool the same way (k_scale folded into the
    softmax scale, the output times v_scale), against the float64 attention over the dequantised pool."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, bs = 4, 2, 16, 4
    tables, starts, lengths = [[3, 0, 5], [1, 4]], [9, 2], [1, 5]
    k_scale, v_scale = 0.03, 0.02
    t = sum(lengths)
    k_cache = qops.quantize_kv(torch.randn(8, bs, kv_heads, d, generator=g), k_scale)
    v_cache = qops.quantize_kv(torch.randn(8, bs, kv_heads, d, generator=g), v_scale)
    q = torch.randn(t, heads, d, generator=g)
    meta = AttentionMetadata.build(tables, starts, lengths, bs, torch.device("cpu"))
    kf = k_cache.float().view(-1, kv_heads, d)[meta.slot_mapping] * k_scale  # what the cache holds for the step
    vf = v_cache.float().view(-1, kv_heads, d)[meta.slot_mapping] * v_scale
    kc, vc = k_cache.clone(), v_cache.clone()
    out = paged_attention(q, kf, vf, kc, vc, meta, 0.25, k_scale, v_scale)
    assert torch.equal(kc.view(torch.uint8), k_cache.view(torch.uint8))  # the step's K rewrote the same bytes
    kd, vd = (k_cache.double() * k_scale), (v_cache.double() * v_scale)
    ref = paged_attention(q.double(), kf.double(), vf.double(), kd, vd, meta, 0.25)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    _, _, pmeta = build_step_tensors(tables, starts, lengths, bs, heads // kv_heads, torch.device("cpu"))
    emu = emulate_paged_attention(q, k_cache, v_cache, pmeta, 0.25, tile=8, k_scale=k_scale, v_scale=v_scale)
    assert torch.allclose(emu.double(), ref, atol=1e-5)
