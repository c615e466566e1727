"""Which matmuls take the Triton GEMV path (`replicas.engine.kernels.gemv`): CUDA inputs of at most `MAX_M`
rows (decode batches), 2-D, contiguous last dims, float weights, or int8 / FP8 weights with a per-row scale up to
`MAX_M_QUANT` rows. Everything else (CPU, prefill, mixed steps) keeps F.linear (or `quant.ops.linear`) and the
separate norm / SiLU-mul stages, which stay the reference.

Switches (`envs`): LLMC_GEMV=0 or LLMC_NO_FUSION=1 turn the path off, LLMC_GEMV_MAX_M (LLMC_GEMV_MAX_M_QUANT for
quantised weights) sets the largest row count it takes, LLMC_GEMV_LM_HEAD=0 keeps the LM head on cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from replicas.engine.envs import SWITCHES

ENABLED = SWITCHES.gemv and not SWITCHES.no_fusion
# One row by default: at 4 and 8 rows the tl.dot path with its fused stages is slower per layer than cuBLAS +
# the separate kernels, at one row faster (bench_gemv's "layer" sweep, docs/bench-gpu/h100-gemv-sweep2.json).
MAX_M = SWITCHES.gemv_max_m
# Quantised (int8 / FP8) weights: up to this many rows, where reading 1-byte weights in the kernel beats
# upcasting them for cuBLAS (`replicas.engine.quant.ops`).
MAX_M_QUANT = SWITCHES.gemv_max_m_quant
# The LM head (vocab rows): its own switch, since cuBLAS may stream a matrix this tall as well.
LM_HEAD = SWITCHES.gemv_lm_head
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)  # with a per-row scale


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    quant = weight.dtype in _QUANT_DTYPES
    return (ENABLED and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= (MAX_M_QUANT if quant else MAX_M)
            and x.dtype in _DTYPES and (quant or weight.dtype == x.dtype) and x.stride(-1) == 1
            and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV kernel where `applies`."""
    if applies(x, weight):
        from replicas.engine.kernels.gemv import gemv
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
