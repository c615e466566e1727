"""The decoder every supported family runs, tensor-parallel ready: Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv
bias), Qwen3 (q/k RMSNorm), Phi-3/4 (fused qkv and gate_up checkpoints, partial rotary), Gemma 2/3 (sandwich
norms, (1 + w) RMSNorm, scaled embeddings, soft-capping, alternating sliding/global layers) and the
mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE; `models.moe`). Module names mirror Hugging Face
checkpoints so weights load by name."""
from __future__ import annotations

import torch
from torch import nn

from replicas.engine import gemv
from replicas.engine.attention import AttentionMetadata, paged_attention
from replicas.engine.fused import fused
from replicas.engine.models.args import ModelArgs
from replicas.engine.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
)
from replicas.engine.models.moe import SparseMoE, activation


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + w), in fp32, then casts (weights are stored as offsets from 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.weight.data.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            return _gemma_rms_norm(x, self.weight, self.eps), x
        return _gemma_rms_norm(x, self.weight, self.eps)


def _gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


def _norm(args: ModelArgs, dim: int) -> RMSNorm:
    return GemmaRMSNorm(dim, args.rms_norm_eps) if args.gemma_norms else RMSNorm(dim, args.rms_norm_eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo, window: int = 0):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads,
                                          args.qkv_bias, tp)
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size, args.o_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.attn_scale or args.head_dim ** -0.5
        self.window = window  # sliding window in tokens, 0: full attention
        self.softcap = args.attn_softcap
        if args.qk_norm:
            self.q_norm = _norm(args, args.head_dim)
            self.k_norm = _norm(args, args.head_dim)
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
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.k_scale, self.v_scale,
                            window=self.window, softcap=self.softcap)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [args.intermediate_size] * 2,
                                                       args.mlp_bias, tp)
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size, args.mlp_bias, tp)
        self.silu = args.hidden_act == "silu"
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.silu:
            return self.down_proj(_silu_and_mul(h))
        gate, up = h.chunk(2, -1)
        return self.down_proj(self.act(gate) * up)


@fused("silu_and_mul")
def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return nn.functional.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo, index: int = 0):
        super().__init__()
        window = args.layer_windows[index] if args.layer_windows else 0
        self.self_attn = Attention(args, tp, window)
        moe = bool(args.moe_layers) and args.moe_layers[index]
        if moe and args.model_type == "mixtral":
            self.block_sparse_moe = SparseMoE(args, tp)
            self.ffn = self.block_sparse_moe
        else:
            self.mlp = SparseMoE(args, tp) if moe else MLP(args, tp)
            self.ffn = self.mlp
        self.input_layernorm = _norm(args, args.hidden_size)
        self.post_attention_layernorm = _norm(args, args.hidden_size)
        # Decode GEMVs with the norms fused in: Llama-style dense layers only.
        self.gemv_path = isinstance(self.ffn, MLP) and self.ffn.silu and not args.gemma_norms

    def forward(self, positions, x, residual, meta):
        if self.gemv_path and gemv.applies(x, self.mlp.gate_up_proj.weight):
            return self._forward_gemv(positions, x, residual, meta)
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.ffn(x), residual

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


class GemmaDecoderLayer(nn.Module):
    """Gemma 2/3: norms before and after both the attention and the MLP (the residual adds the normed output)."""

    def __init__(self, args: ModelArgs, tp: TPInfo, index: int = 0):
        super().__init__()
        self.self_attn = Attention(args, tp, args.layer_windows[index] if args.layer_windows else 0)
        self.mlp = MLP(args, tp)
        self.input_layernorm = _norm(args, args.hidden_size)
        self.post_attention_layernorm = _norm(args, args.hidden_size)
        self.pre_feedforward_layernorm = _norm(args, args.hidden_size)
        self.post_feedforward_layernorm = _norm(args, args.hidden_size)

    def forward(self, positions, x, residual, meta):
        if residual is not None:  # the previous layer's output is x + residual
            x = x + residual
        h = self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        x = x + h
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return h, x


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        layer = GemmaDecoderLayer if args.gemma_norms else DecoderLayer
        self.layers = nn.ModuleList([layer(args, tp, i) for i in range(args.num_layers)])
        self.norm = _norm(args, args.hidden_size)


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
        rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling,
                                 args.rotary_dim or None)
        self.rotary = rotary
        # Gemma 3: sliding layers rotate with their own base and no scaling.
        local = None if args.local_rope_theta is None else RotaryEmbedding(
            args.head_dim, args.max_position_embeddings, args.local_rope_theta, None, args.rotary_dim or None)
        self.local_rotary = local
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.rotary = local if local is not None and attn.window else rotary
        self.attention_windows = sorted({layer.self_attn.window for layer in self.model.layers})

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.args.embed_scale != 1.0:
            # transformers rounds the scale to the weights' dtype first.
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.args.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap
