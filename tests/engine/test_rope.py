"""Rotary scalings against transformers' own rope init functions (`ROPE_INIT_FUNCTIONS`), read from the config
the way the engine reads a config.json: inverse frequencies and the attention factor that scales cos/sin."""
from __future__ import annotations

import pytest
import torch

from replicas.engine.models import ModelArgs
from replicas.engine.models.layers import RotaryEmbedding, rope_parameters

LONG = [1.0 + 0.25 * i for i in range(16)]
SHORT = [1.0 + 0.05 * i for i in range(16)]


def _hf(cfg, long: bool = False):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = cfg.rope_parameters
    orig = params.get("original_max_position_embeddings", cfg.max_position_embeddings)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=orig + 1 if long else None)


def _ours(cfg, long: bool = False):
    args = ModelArgs.from_dict(cfg.to_dict())
    dim = args.rotary_dim or args.head_dim
    return args, rope_parameters(dim, args.rope_theta, args.rope_scaling, long=long)


def _check(cfg, long=False):
    ref_inv, ref_factor = _hf(cfg, long)
    args, (inv, factor) = _ours(cfg, long)
    assert inv.shape == ref_inv.shape
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-9)
    return args


@pytest.mark.parametrize("params", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # Qwen2.5 style
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},  # DeepSeek style attention factor
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "attention_factor": 1.3,
     "truncate": False},
])
def test_yarn_equals_transformers(params):
    from transformers import Qwen2Config
    cfg = Qwen2Config(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                      rope_parameters={"rope_theta": 1e6, **params})
    args = _check(cfg)
    assert args.rope_scaling["rope_type"] == "yarn"


def test_yarn_legacy_rope_scaling_key():
    """Qwen2.5's config.json: rope_theta beside rope_scaling {"type": "yarn", ...}."""
    cfg = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 32768, "rope_theta": 1e6,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    args = ModelArgs.from_dict(cfg)
    assert args.rope_scaling["rope_type"] == "yarn" and args.rope_theta == 1e6


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("long", [False, True])
def test_longrope_equals_transformers(partial, long):
    """Phi-3 (full rotary) and Phi-4-mini (partial rotary) longrope: short and long factors, attention
    factor from the ratio of max_position_embeddings to the top-level original_max_position_embeddings."""
    from transformers import Phi3Config
    n = int(32 * partial) // 2
    cfg = Phi3Config(vocab_size=64, hidden_size=128, num_attention_heads=4, max_position_embeddings=1024,
                     original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "long_factor": LONG[:n],
                                      "short_factor": SHORT[:n], "partial_rotary_factor": partial})
    args = _check(cfg, long)
    assert args.longrope_original == 64
    assert args.rotary_dim == (0 if partial == 1.0 else 16)


def test_phi3_su_is_longrope():
    cfg = {"model_type": "phi3", "vocab_size": 10, "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 4096,
           "original_max_position_embeddings": 128,
           "rope_scaling": {"type": "su", "long_factor": [2.0] * 8, "short_factor": [1.0] * 8}}
    assert ModelArgs.from_dict(cfg).rope_scaling["rope_type"] == "longrope"


def test_llama3_equals_transformers():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    _check(cfg)


def test_rotary_table_scales_cos_sin_and_keeps_pass_dims():
    """The attention factor multiplies cos and sin (transformers' attention_scaling); partial rotary leaves
    the trailing dims untouched."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
               "max_position_embeddings": 64}
    rot = RotaryEmbedding(8, 64, 1e4, scaling, rotary_dim=4)
    _, factor = rope_parameters(4, 1e4, scaling)
    assert factor > 1.0
    torch.testing.assert_close(rot.cos_sin[0], torch.tensor([factor, factor, 0.0, 0.0]))
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    qr, kr = rot(torch.tensor([0, 5, 9]), q, k)
    assert torch.equal(qr[..., 4:], q[..., 4:]) and torch.equal(kr[..., 4:], k[..., 4:])
    assert not torch.allclose(qr[1:, :, :4], q[1:, :, :4])


def test_gemma3_legacy_config_reads_like_transformers():
    """Gemma 3 text configs on the Hub: rope_theta + rope_local_base_freq + rope_scaling for the global layers,
    sliding_window_pattern instead of layer_types. Read as transformers' Gemma3TextConfig reads them."""
    from transformers import Gemma3TextConfig
    legacy = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
              "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
              "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "query_pre_attn_scalar": 16}
    args = ModelArgs.from_dict(legacy)
    hf = Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert args.layer_windows == tuple(512 if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert args.layer_windows == (512,) * 5 + (0, 512)
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert args.rope_theta == full["rope_theta"] and args.rope_scaling["factor"] == full["factor"] == 8.0
    assert args.local_rope_theta == local["rope_theta"] == 10000.0 and local["rope_type"] == "default"
    assert args.attn_scale == 16 ** -0.5 and args.embed_scale == 8.0 and args.tie_word_embeddings
