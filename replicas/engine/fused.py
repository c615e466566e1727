"""Fusion of the small stages between the matmuls (RMSNorm with its residual add, rotary, SiLU-and-mul) on
GPU: `@fused` compiles a pure tensor function with torch.compile the first time it sees CUDA tensors, so
each stage is one kernel instead of ~10 launches (which would dominate a bandwidth-bound decode step).
CPU calls run the function as written: one definition of the math for both."""
from __future__ import annotations

import functools
import os

import torch

# LLMC_NO_FUSION=1 runs the plain functions on GPU too (debugging, A/B timing).
_ENABLED = os.environ.get("LLMC_NO_FUSION", "") in ("", "0")


def fused(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if _ENABLED and args[0].is_cuda:
            if compiled is None:
                compiled = torch.compile(fn, fullgraph=True)
            return compiled(*args)
        return fn(*args)
    return wrapper
