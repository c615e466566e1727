"""Model code units: config parsing across transformers versions and families, RoPE scaling against
transformers' own implementation, checkpoint completeness, and Mistral greedy parity."""
from __future__ import annotations

import json

import pytest
import torch

from replicas.engine.models import CausalLM, ModelArgs
from replicas.engine.models.layers import rope_inv_freq
from replicas.engine.weights import load_weights
from tests.fixtures.engine import HFReference, greedy, make_engine, random_prompts, request, run_all, tokens_of

BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def test_rope_theta_from_transformers5_rope_parameters_or_legacy_fields():
    new = ModelArgs.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    assert new.rope_theta == 123.0 and new.rope_scaling is None
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = ModelArgs.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": scaling})
    assert old.rope_theta == 500000.0 and old.rope_scaling["rope_type"] == "llama3"
    assert ModelArgs.from_dict(BASE).rope_theta == 10000.0


def test_family_flags_and_eos_lists():
    assert ModelArgs.from_dict({**BASE, "model_type": "qwen2"}).qkv_bias
    qwen3 = ModelArgs.from_dict({**BASE, "model_type": "qwen3", "head_dim": 32})
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32
    assert ModelArgs.from_dict({**BASE, "eos_token_id": [7, 9]}).eos_token_ids == (7, 9)
    # Mistral's sliding window applies to every layer; the context is not capped to it.
    mistral = ModelArgs.from_dict({**BASE, "model_type": "mistral", "sliding_window": 1024})
    assert mistral.layer_windows == (1024, 1024) and mistral.max_position_embeddings == 4096
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelArgs.from_dict({**BASE, "model_type": "gpt2"})


def test_llama3_inv_freq_equals_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=4096, rope_parameters=params)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.allclose(rope_inv_freq(32, 500000.0, params), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_inv_freq(32, 1e4, {"rope_type": "dynamic", "factor": 2.0})


def test_missing_checkpoint_tensor_is_an_error(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    model = CausalLM(ModelArgs.from_dir(tmp_path))
    with pytest.raises(KeyError, match="qkv_proj.weight:k"):
        load_weights(model, tmp_path)


def test_mistral_parity(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from load_tests.tiny_model import build_tokenizer
    tok = build_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                        sliding_window=None, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral"
    engine = make_engine(tmp_path)
    prompts = random_prompts(4, engine.vocab_size, 3, 30, seed=41)
    chunks = run_all(engine, [request(i, p, greedy(8)) for i, p in enumerate(prompts)])
    hf = HFReference(tmp_path)
    for i, p in enumerate(prompts):
        assert tokens_of(chunks[str(i)]) == hf.generate(p, 8)
