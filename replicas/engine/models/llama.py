"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm),
tensor-parallel ready. Module names mirror Hugging Face checkpoints so weights load by name."""
from __future__ import annotations

import torch
from torch import nn

from replicas.engine import gemv
from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.fused import fused
from replicas.engine.models.args import ModelArgs
from replicas.engine.models.layers import (
    MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear,
    TPInfo, VocabParallelEmbedding,
)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads,
                                          args.qkv_bias, tp)
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size, args.o_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim ** -0.5
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = None  # shared RotaryEmbedding, set by the model
        self.k_cache = self.v_cache = torch.empty(0)  # views into the pool, set by the model runner
        self.k_scale = self.v_scale = 1.0  # an FP8 pool's scales (a checkpoint may publish them)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(x), meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Everything after the qkv projection: q/k norm, rotary, paged attention, o_proj."""
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [args.intermediate_size] * 2,
                                                       args.mlp_bias, tp)
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size, args.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_silu_and_mul(self.gate_up_proj(x)))


@fused("silu_and_mul")
def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return nn.functional.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.self_attn = Attention(args, tp)
        self.mlp = MLP(args, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        if gemv.applies(x, self.mlp.gate_up_proj.weight):
            return self._forward_gemv(positions, x, residual, meta)
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def _forward_gemv(self, positions, x, residual, meta):
        """Decode rows on GPU: the norms ride in the qkv and gate_up GEMVs' prologues (with the residual add),
        SiLU-and-mul in gate_up's epilogue (`replicas.engine.kernels.gemv`). Same arithmetic as `forward`."""
        from replicas.engine.kernels.gemv import norm_linear
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = norm_linear(x, residual, ln1.weight, ln1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                    scale=attn.qkv_proj.weight_scale)
        x = attn.attend(positions, qkv, meta)
        h, residual = norm_linear(x, residual, ln2.weight, ln2.eps, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                                  silu=True, scale=mlp.gate_up_proj.weight_scale)
        return mlp.down_proj(h), residual


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        self.layers = nn.ModuleList([DecoderLayer(args, tp) for _ in range(args.num_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """forward() -> final hidden states of every packed token; compute_logits() on the rows to sample."""

    # Checkpoint tensor name part -> (our fused module, shard id).
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, args: ModelArgs, tp: TPInfo = TPInfo()):
        super().__init__()
        self.args = args
        self.model = Backbone(args, tp)
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, tp)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling)
        self.rotary = rotary
        for layer in self.model.layers:
            layer.self_attn.rotary = rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
