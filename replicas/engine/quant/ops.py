"""The tensor side of quantisation (`replicas.engine.quant` says which scheme runs): building quantised linear
weights, quantising a checkpoint shard as it loads, the quantised matmul, and the FP8 KV cache's conversions.

A quantised linear holds `weight` [rows, cols] in int8 or float8_e4m3fn and `weight_scale` [rows] in float32:
W ~= weight * weight_scale[:, None]. Where the matmul runs:
- decode rows on GPU (<= gemv.MAX_M_QUANT): the Triton GEMV reads the 1-byte weights and applies the row scale in
  its epilogue (`replicas.engine.kernels.gemv`), so batch-1 decode streams half the bytes of bf16;
- CPU int8: torch._weight_int8pack_mm (int8 weights, per-row scales, no dequantised copy);
- fp8 w8a8 (CPU and GPU): per-token activation scales, FP8 x FP8 in torch._scaled_mm with row-wise scales;
- otherwise (GPU int8 or fp8 weight_only past the GEMV rows): the weights upcast, F.linear, the row scale after.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from replicas.engine.quant import QuantScheme

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
STORAGE = {"int8": torch.int8, "fp8": FP8}

_building: QuantScheme | None = None


@contextlib.contextmanager
def building(scheme: QuantScheme | None):
    """Linear layers constructed inside take this scheme's storage (like torch.set_default_dtype for dtypes), so
    model code builds quantised and unquantised models alike."""
    global _building
    old, _building = _building, scheme
    try:
        yield
    finally:
        _building = old


def current() -> QuantScheme | None:
    return _building if _building is not None and _building.quantized else None


def quantize_rows(w: torch.Tensor, dtype: torch.dtype, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [rows, cols] in dtype, scale [rows] float32), symmetric: w ~= q * scale[:, None]."""
    wf = w.float()
    qmax = INT8_MAX if dtype == torch.int8 else FP8_MAX
    amax = wf.abs().amax() if per_tensor else wf.abs().amax(dim=1)
    scale = (amax / qmax).clamp(min=1e-12)
    if per_tensor:
        scale = scale.expand(w.shape[0]).clone()
    q = (wf / scale[:, None]).clamp(-qmax, qmax)
    q = q.round().to(torch.int8) if dtype == torch.int8 else q.to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def store_rows(weight: torch.Tensor, scale: torch.Tensor, offset: int, src: torch.Tensor, per_tensor: bool) -> bool:
    """Rows [offset, offset + len(src)) of a quantised weight from one checkpoint shard. Quantised here unless the
    checkpoint already holds them in the weight's storage type (a pre-quantised checkpoint: copied as they are,
    their scale comes with the checkpoint's weight_scale). Returns whether the scale rows were written."""
    rows = slice(offset, offset + src.shape[0])
    if src.dtype == weight.dtype:
        weight.data[rows].copy_(src)
        return False
    if src.dtype in (torch.int8, FP8):
        raise ValueError(f"a {src.dtype} checkpoint tensor cannot load into {weight.dtype} weights")
    q, s = quantize_rows(src.to(weight.device), weight.dtype, per_tensor)
    weight.data[rows].copy_(q)
    scale.data[rows].copy_(s)
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           w8a8: bool) -> torch.Tensor:
    """F.linear(x, dequantised weight, bias) for x [T, K], through the path the module docstring describes."""
    from replicas.engine import gemv
    if gemv.applies(x, weight):
        from replicas.engine.kernels.gemv import gemv as triton_gemv
        return triton_gemv(x, weight, bias, scale=scale)
    if weight.dtype == torch.int8 and x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype))
    elif w8a8 and weight.dtype == FP8 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0:
        y = fp8_w8a8(x, weight, scale)
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: (xq [T, K] E4M3, scale [T, 1] float32)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_w8a8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = quantize_tokens(x)
    # Row-wise scaling on CUDA produces bf16 only.
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=out_dtype)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------- FP8 KV cache


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)
