"""A tiny random-weight Llama (and Qwen-style variants) with a small byte-level BPE tokenizer,
built in seconds, saved with save_pretrained: the model most tests and the CPU benchmark run on."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "What is the capital of France? The capital of France is Paris.",
    "Ray Serve routes requests to replicas; a paged KV cache stores keys and values in blocks.",
    "Ünïcödé test: naïve café, 東京, Привет мир, emoji 🙂🚀 and more text to learn merges from.",
    "def hello(name):\n    return f'hello {name}'\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, arch: str = "llama", num_heads: int = 4,
                     num_kv_heads: int = 2, hidden: int = 64, layers: int = 2,
                     vocab_size: int = 512, seed: int = 0, max_positions: int = 4096,
                     tie_word_embeddings: bool = False, tokenizer=None, silent_tokens: tuple[int, ...] = ()) -> Path:
    """Write a random-weight model + tokenizer to out_dir (safetensors) and return the path.

    arch: "llama" (Llama/SmolLM2/Mistral layout), "qwen2" (qkv bias) or "qwen3" (q/k norm).
    tokenizer: a PreTrainedTokenizerFast to ship instead of the small BPE one (vocab_size is then its size).
    silent_tokens: ids the model never generates under greedy decoding (their output rows are zero:
    logit 0 against the max of hundreds of well-separated random logits), as a trained chat model never
    emits <unk> or <|im_start|> mid-answer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size) if tokenizer is None else tokenizer
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=tie_word_embeddings)
    if arch == "llama":
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common, head_dim=hidden // num_heads)
    elif arch == "qwen2":
        from transformers import Qwen2Config
        cfg = Qwen2Config(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config
        cfg = Qwen3Config(**common, head_dim=hidden // num_heads)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init is tiny (std 0.02): logits come out nearly flat and greedy ties appear. Wider
    # weights give confident, well-separated logits so token-for-token parity is meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 2.0)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
        if silent_tokens:
            if tie_word_embeddings:
                raise ValueError("silent_tokens needs untied embeddings (zero rows would blank their inputs too)")
            model.get_output_embeddings().weight[list(silent_tokens)] = 0.0
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


# Tiny variants of every family the engine serves, as (transformers config class, its kwargs). Small windows,
# original contexts and expert counts, so that short test prompts cross every boundary.
def family_configs() -> dict[str, tuple[str, dict]]:
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "long_factor": [1.0 + 0.3 * i for i in range(6)], "short_factor": [1.0 + 0.02 * i for i in range(6)]}
    return {
        "llama-yarn": ("LlamaConfig", dict(head_dim=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})),
        "mistral-window": ("MistralConfig", dict(head_dim=16, sliding_window=8)),
        "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
        "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
        "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                            sliding_window_pattern=2, tie_word_embeddings=True,
                                            rope_parameters={
                                                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 100000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
        "phi3": ("Phi3Config", dict(sliding_window=None)),
        "phi3-window": ("Phi3Config", dict(sliding_window=8)),
        "phi4-mini-longrope": ("Phi3Config", dict(original_max_position_embeddings=32, rope_parameters=longrope,
                                                  max_position_embeddings=256)),
        "mixtral": ("MixtralConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=None)),
        "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48, norm_topk_prob=False,
                                             mlp_only_layers=[1])),
        "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                             moe_intermediate_size=32, norm_topk_prob=True)),
    }


def build_family_model(out_dir: str | Path, family: str, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                       max_positions: int = 256, **overrides) -> Path:
    """A random-weight model of one of `family_configs()`, built with transformers' own config class and saved
    with save_pretrained (safetensors), with the small BPE tokenizer. Norm weights are randomised too, so that
    each family's norm convention (w or 1 + w) matters."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cls_name, kwargs = family_configs()[family]
    kwargs = {**dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
              **kwargs, **overrides}
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
