"""Tensor-parallel building blocks shared by every model: parallel linears, vocab-parallel embedding and
LM head, RMSNorm, rotary embedding.

Each parameter carries a `weight_loader(param, tensor_slice, shard_id=None)` that reads only this rank's
part of a checkpoint tensor from a safetensors slice (`safe_open(...).get_slice(name)`), so a rank never
materialises the full weight. With tp.size == 1 every layer is a plain dense layer and no collective runs.

Linear layers built under `quant.ops.building(scheme)` hold int8 / FP8 weights with a per-row `weight_scale`
(`replicas.engine.quant`); each checkpoint shard is quantised as it loads (or copied, from a pre-quantised
checkpoint, with its published scale), so the full-precision weight never exists on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from replicas.engine import gemv
from replicas.engine.fused import fused
from replicas.engine.models.args import rope_type
from replicas.engine.quant import ops as qops


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None with size 1
    # GPU: one-shot all-reduce for small tensors (`replicas.engine.allreduce`): returns None when x does not fit.
    fast_all_reduce: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            if self.fast_all_reduce is not None and (y := self.fast_all_reduce(x)) is not None:
                return y
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by tensor-parallel size {b}")
    return a // b


def _read(sl, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start+size) of a safetensors slice (or a tensor)."""
    if dim == 0:
        return sl[start:start + size]
    return sl[:, start:start + size]


def _shape(sl) -> list[int]:
    return list(sl.shape) if isinstance(sl, torch.Tensor) else sl.get_shape()


class _Linear(nn.Module):
    """The weight storage every parallel linear shares: plain, or quantised with a per-row scale."""

    def _init_weight(self, rows: int, cols: int) -> None:
        scheme = qops.current()
        self.w8a8 = bool(scheme and scheme.w8a8)
        self.per_tensor = bool(scheme and scheme.per_tensor)
        dtype = qops.STORAGE[scheme.method] if scheme else None
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if scheme:
            self.weight_scale = nn.Parameter(torch.ones(rows, dtype=torch.float32), requires_grad=False)
            self.weight_scale.weight_loader = self.scale_loader
        else:
            self.register_parameter("weight_scale", None)

    def _rows(self, shard_id) -> tuple[int, int, int]:
        """(first row in this rank's weight, rows, first row in the checkpoint tensor) of a checkpoint tensor."""
        raise NotImplementedError

    def _put(self, param: nn.Parameter, offset: int, src: torch.Tensor) -> bool:
        """Copy src into rows [offset, ...) of param, quantising it into a quantised weight. Returns whether a
        quantised weight's scale rows were written too."""
        if param is self.weight and self.weight_scale is not None:
            return qops.store_rows(param, self.weight_scale, offset, src, self.per_tensor)
        param.data[offset:offset + src.shape[0]].copy_(src)
        return False

    def scale_loader(self, param: nn.Parameter, t: torch.Tensor, shard_id=None) -> None:
        """A pre-quantised checkpoint's weight_scale (the whole tensor): one per tensor, or one per output row."""
        offset, size, start = self._rows(shard_id)
        t = t.float().reshape(-1)
        param.data[offset:offset + size].copy_(t.expand(size) if t.numel() == 1 else t[start:start + size])

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return gemv.linear(x, self.weight, bias)
        return qops.linear(x, self.weight, self.weight_scale, bias, self.w8a8)


class ColumnParallelLinear(_Linear):
    """y = x W^T with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self._init_weight(_divide(out_features, tp.size), in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.weight.shape[0]), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _rows(self, shard_id) -> tuple[int, int, int]:
        n = self.weight.shape[0]
        return 0, n, self.tp.rank * n

    def weight_loader(self, param: nn.Parameter, sl, shard_id=None) -> bool:
        offset, size, start = self._rows(shard_id)
        return self._put(param, offset, _read(sl, 0, start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate+up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TPInfo):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def _rows(self, shard_id) -> tuple[int, int, int]:
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        return offset, size, self.tp.rank * size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v fused. Query heads are split across ranks; KV heads too, or replicated (one per rank)
    when there are fewer KV heads than ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPInfo):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size)
        self.total_kv_heads = num_kv_heads
        if tp.size <= num_kv_heads:
            self.num_kv_heads = _divide(num_kv_heads, tp.size)
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            _divide(tp.size, num_kv_heads)
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank * num_kv_heads // tp.size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out * tp.size, bias, tp)

    def _rows(self, shard_id) -> tuple[int, int, int]:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q, self.tp.rank * q
        return q if shard_id == "k" else q + kv, kv, self.kv_head_start * self.head_dim


class RowParallelLinear(_Linear):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self._init_weight(out_features, _divide(in_features, tp.size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = lambda p, sl, shard_id=None: p.data.copy_(sl[:])
        else:
            self.register_parameter("bias", None)

    def _rows(self, shard_id) -> tuple[int, int, int]:
        return 0, self.weight.shape[0], 0  # every output row; the columns are split

    def weight_loader(self, param: nn.Parameter, sl, shard_id=None) -> bool:
        n = param.shape[1]
        return self._put(param, 0, _read(sl, 1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._linear(x, None))
        # Bias after the reduction, or it would be added tp.size times.
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; each rank looks up its own ids, zeros the rest, all-reduce."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, sl, shard_id=None) -> None:
        n = min(self.shard, _shape(sl)[0] - self.start)
        param.data[:n].copy_(_read(sl, 0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab rows, gathered to the full (unpadded) vocab."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        linear = gemv.linear if gemv.LM_HEAD else F.linear
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight))
        return logits[..., :self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual), the pre-norm block's fused add."""
        if residual is None:
            return _rms_norm(x, self.weight, self.eps)
        return _add_rms_norm(x, residual, self.weight, self.eps)


@fused("rms_norm")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@fused("add_rms_norm")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return _rms_norm.__wrapped__(x, weight, eps), x


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, *, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of the rotary dims (`head_dim` here is the rotary dim), with the config's position
    scaling applied; each formula is transformers' rope init function for that type (`ROPE_INIT_FUNCTIONS`).
    `long`: longrope's long factors (positions past the original context) instead of its short ones."""
    return rope_parameters(head_dim, theta, scaling, long=long)[0]


def rope_parameters(dim: int, theta: float, scaling: dict | None, *, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], attention factor that scales cos and sin). `scaling` carries
    `original_max_position_embeddings` and `max_position_embeddings` where the type needs them (ModelArgs
    puts them there as transformers' standardize_rope_params does)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (theta ** exponents)
    kind = rope_type(scaling)  # refuses the types the engine does not implement
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling)
    if kind == "longrope":
        return _longrope(dim, theta, scaling, long)
    raise AssertionError(f"rope_type {kind!r} is in SUPPORTED_ROPE_TYPES but not implemented here")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor")
    if factor is None:  # DeepSeek-V3 style: the ratio of the extended to the pretrained context
        factor = s["max_position_embeddings"] / original
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp's singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention_factor


def _longrope(dim: int, base: float, s: dict, long: bool) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the pretrained context
        factor = s["max_position_embeddings"] / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(s["long_factor"] if long else s["short_factor"], dtype=torch.float32)
    inv = 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv, attention_factor


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE from a cos/sin table indexed by absolute position, on the first
    `rotary_dim` dims of each head (partial rotary: the rest pass through).

    longrope keeps two tables, short factors at rows [0, max_positions) and long factors after them: the model
    runner adds `max_positions` to the positions of sequences past the original context (`long_offset`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        self.head_dim = head_dim
        regimes = (False, True) if rope_type(scaling) == "longrope" else (False,)
        tables = []
        for long in regimes:
            inv, attention_factor = rope_parameters(self.rotary_dim, theta, scaling, long=long)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv)
            tables.append(torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor)
        self.long_offset = max_positions if len(regimes) == 2 else 0
        self.register_buffer("cos_sin", torch.cat(tables), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        r = self.rotary_dim
        if r == self.head_dim:
            return _apply_rotary(self.cos_sin, positions, q, k)
        q_rot, k_rot = _apply_rotary(self.cos_sin, positions, q[..., :r], k[..., :r])
        return torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)


@fused("apply_rotary")
def _apply_rotary(cos_sin: torch.Tensor, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
