"""ModelArgs: the architecture facts the engine needs, read from a Hugging Face config.json.

Torch-free: the launcher's early model check (`check_supported`) runs before anything starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> (qkv bias default, q/k norm)
_FAMILIES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True),
             "gemma2": (False, False), "gemma3_text": (False, True), "phi3": (False, False),
             "mixtral": (False, False), "qwen2_moe": (True, False), "qwen3_moe": (False, True)}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
_GEMMA = ("gemma2", "gemma3_text")
# Families whose every layer slides when the config sets a window (no per-layer types).
_ALL_LAYERS_SLIDE = ("mistral", "mixtral", "phi3")
# The position scalings layers.rope_parameters implements.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# Activations of the gated MLP, by their transformers name.
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Where a model_type names a multimodal or otherwise different checkpoint, what to serve instead.
_HINTS = {"gemma3": "the multimodal Gemma 3 checkpoint; its text-only model_type 'gemma3_text' is supported",
          "gemma": "Gemma 1; gemma2 and gemma3_text are supported"}


def rope_params(cfg: dict) -> dict:
    """A config.json's rope settings: transformers 5 keeps theta and scaling together in rope_parameters;
    older configs use rope_theta plus rope_scaling. Gemma 3 nests them by layer type: the full-attention ones."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        rope = rope.get("full_attention") or {}
    return rope


def rope_type(rope: dict | None) -> str:
    """The rope type of rope settings ("default" when none); ValueError naming it if the engine cannot run it.
    Shared by the engine and the launcher's early model check, so both refuse exactly the same configs."""
    kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return kind


def _activation(cfg: dict) -> str:
    return cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"


def check_supported(cfg: dict) -> None:
    """ValueError naming what the engine cannot run in a config.json: its model_type (with the architecture
    it declares), its rope type, its MLP activation, or a quantization method it cannot load
    (`replicas.engine.quant`)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "none declared"
        hint = f"; {_HINTS[model_type]}" if model_type in _HINTS else ""
        raise ValueError(f"unsupported model_type {model_type!r} (architecture: {arch}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}){hint}")
    for rope in _all_ropes(cfg):
        rope_type(_phi3_alias(model_type, rope))
    act = _activation(cfg)
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r} (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (an embedding model) is not supported: the engine generates "
                         "causally")
    from replicas.engine.quant import checkpoint_method
    checkpoint_method(cfg)


def _all_ropes(cfg: dict) -> list[dict]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        return [r or {} for r in rope.values()]
    return [rope]


def _phi3_alias(model_type: str, rope: dict) -> dict:
    # transformers' Phi3Config reads the names early Phi-3 checkpoints used ("su", "yarn") as longrope.
    if model_type == "phi3" and (rope.get("rope_type") or rope.get("type")) in ("su", "yarn"):
        return {**rope, "rope_type": "longrope"}
    return rope


def _standard_rope(cfg: dict, rope: dict, max_pos: int, top_level_original: bool) -> dict | None:
    """Scaling settings as the engine's rope functions read them (transformers' standardize_rope_params):
    the pretrained context in `original_max_position_embeddings`, the config's context beside it."""
    kind = rope_type(rope)
    if kind == "default":
        return None
    out = dict(rope, rope_type=kind, max_position_embeddings=max_pos)
    if kind in ("llama3", "yarn", "longrope"):
        if top_level_original and "original_max_position_embeddings" in cfg:
            out["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        else:
            out.setdefault("original_max_position_embeddings", max_pos)
    return out


def _layer_windows(cfg: dict, model_type: str, num_layers: int) -> tuple[int, ...]:
    """Per layer: its sliding window in tokens (a query at position p sees keys (p - window, p]), 0 for full
    attention. transformers' own rules: `layer_types` where the family has them, else every layer."""
    window = cfg.get("sliding_window") or 0
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window"):
        window = 0
    if not window:
        return (0,) * num_layers
    if model_type in _ALL_LAYERS_SLIDE or model_type == "qwen3_moe":
        return (window,) * num_layers
    types = cfg.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        elif model_type == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        else:  # qwen2, qwen3
            mwl = cfg.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else 0 for t in types)


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
    rotary_dim: int = 0  # dims of each head that rotate (partial rotary); 0: all of them
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window, 0 for full attention; () all full
    # Gemma 3's sliding layers rotate with their own theta (and no scaling).
    local_rope_theta: float | None = None
    hidden_act: str = "silu"
    # Gemma: RMSNorm scales by (1 + w), embeddings by sqrt(hidden), four norms per layer (sandwich).
    gemma_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    attn_softcap: float = 0.0  # tanh soft-capping of attention scores / final logits; 0: none
    final_softcap: float = 0.0
    # Mixture of experts: 0 experts is a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one shared expert behind a sigmoid gate
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or the dense MLP

    @property
    def sliding_window(self) -> int:
        """The window of the sliding layers (0: none slides)."""
        return max(self.layer_windows, default=0)

    @property
    def all_layers_slide(self) -> bool:
        return bool(self.layer_windows) and all(self.layer_windows)

    @property
    def longrope_original(self) -> int:
        """longrope: the pretrained context past which a sequence switches to the long factors; else 0."""
        s = self.rope_scaling
        return s["original_max_position_embeddings"] if s and s["rope_type"] == "longrope" else 0

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelArgs":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        check_supported(cfg)
        model_type = cfg["model_type"]
        qkv_bias, qk_norm = _FAMILIES[model_type]
        rope = _phi3_alias(model_type, rope_params(cfg))
        max_pos = cfg.get("max_position_embeddings", 2048)
        gemma = model_type in _GEMMA
        default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
        theta = rope.get("rope_theta", cfg.get("rope_theta", default_theta))
        scaling = _standard_rope(cfg, rope, max_pos, top_level_original=model_type == "phi3")
        local_theta = None
        if model_type == "gemma3_text":
            nested = cfg.get("rope_parameters") or {}
            local = nested.get("sliding_attention") if isinstance(nested, dict) else None
            local_theta = float((local or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * partial)
        num_layers = cfg["num_hidden_layers"]
        eos = cfg.get("eos_token_id")
        attn_bias = bool(cfg.get("attention_bias", False))
        num_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe"):
            num_experts = 0
        moe_layers: tuple[bool, ...] = ()
        if num_experts:
            step = cfg.get("decoder_sparse_step", 1) or 1
            dense = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        qpas = cfg.get("query_pre_attn_scalar", 256) if gemma else None
        # Gemma 2 caps both by default (transformers' Gemma2Config); Gemma 3 caps neither.
        caps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
        attn_cap = cfg.get("attn_logit_softcapping", caps[0]) if gemma else None
        final_cap = cfg.get("final_logit_softcapping", caps[1]) if gemma else None
        return cls(
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size") or 0, num_layers=num_layers, num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=qkv_bias or attn_bias, o_bias=attn_bias and model_type not in ("qwen2", "qwen2_moe"),
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=qk_norm,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
            layer_windows=_layer_windows(cfg, model_type, num_layers), local_rope_theta=local_theta,
            hidden_act=_activation(cfg), gemma_norms=gemma,
            embed_scale=cfg["hidden_size"] ** 0.5 if gemma else 1.0,
            attn_scale=qpas ** -0.5 if qpas else 0.0,
            attn_softcap=float(attn_cap or 0.0), final_softcap=float(final_cap or 0.0),
            num_experts=num_experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
            if num_experts else 0,
            norm_topk_prob=model_type == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0
            if model_type == "qwen2_moe" else 0,
            moe_layers=moe_layers,
        )
