"""ModelArgs: the architecture facts the engine needs, read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> (qkv bias default, q/k norm)
_FAMILIES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
# The position scalings layers.rope_inv_freq implements.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_params(cfg: dict) -> dict:
    """A config.json's rope settings: transformers 5 keeps theta and scaling together in rope_parameters;
    older configs use rope_theta plus rope_scaling."""
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def rope_type(rope: dict | None) -> str:
    """The rope type of rope settings ("default" when none); ValueError naming it if the engine cannot run it.
    Shared by the engine and the launcher's early model check, so both refuse exactly the same configs."""
    kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return kind


def check_supported(cfg: dict) -> None:
    """ValueError naming what the engine cannot run in a config.json: its model_type (with the architecture
    it declares), its rope type, or a quantization method it cannot load (`replicas.engine.quant`)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "none declared"
        raise ValueError(f"unsupported model_type {model_type!r} (architecture: {arch}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    rope_type(rope_params(cfg))
    from replicas.engine.quant import checkpoint_method
    checkpoint_method(cfg)


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelArgs":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        check_supported(cfg)
        model_type = cfg["model_type"]
        qkv_bias, qk_norm = _FAMILIES[model_type]
        rope = rope_params(cfg)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope_type(rope)
        max_pos = cfg.get("max_position_embeddings", 2048)
        # Sliding-window attention is not implemented: serve only the context where it equals full attention.
        window = cfg.get("sliding_window")
        if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
            max_pos = min(max_pos, window)
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if kind == "default" else dict(rope),
            max_position_embeddings=max_pos, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias or attn_bias, o_bias=attn_bias and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=qk_norm,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )
