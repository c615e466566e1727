"""The small stages between the matmuls (RMSNorm with its residual add, rotary, SiLU-and-mul) on GPU:
`@fused("name")` on a pure tensor function routes CUDA calls to the one-launch Triton kernel of that name in
`replicas.engine.kernels.fused_ops`; CPU calls run the function as written, which is also the kernels' test
reference. Without fusion these stages are ~30 launches per layer, which would dominate a bandwidth-bound
decode step and the host time of eager steps."""
from __future__ import annotations

import functools

from replicas.engine.envs import SWITCHES

# LLMC_NO_FUSION=1 runs the plain functions on GPU too (debugging, A/B timing).
_ENABLED = not SWITCHES.no_fusion


def fused(kernel_name: str):
    def decorate(fn):
        kernel = None

        @functools.wraps(fn)
        def wrapper(*args):
            nonlocal kernel
            if _ENABLED and args[0].is_cuda:
                if kernel is None:
                    from replicas.engine.kernels import fused_ops
                    kernel = getattr(fused_ops, kernel_name)
                return kernel(*args)
            return fn(*args)
        return wrapper
    return decorate
