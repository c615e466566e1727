"""The engine's environment switches, read once at import and in this one place (as vLLM's envs.py). They change
how kernels run, never what the engine computes: A/B timing and debugging. What an operator sets is an
`EngineConfig` field instead.

    LLMC_NO_FUSION=1         plain PyTorch for the small fused stages on GPU, and no GEMV path (a fusion too)
    LLMC_GEMV=0              decode matmuls through cuBLAS instead of the Triton GEMV kernel
    LLMC_GEMV_MAX_M=N        the most rows a matmul may have and take the GEMV path (default 1)
    LLMC_GEMV_MAX_M_QUANT=N  the same for int8 / FP8 weights (default 16)
    LLMC_GEMV_LM_HEAD=0      the LM head through cuBLAS, the other GEMVs unchanged
    LLMC_GEMV_CONFIGS=FILE   GEMV launch configs over the device tables: {"N,K": [BLOCK_N, BLOCK_K, num_warps]},
                             as `load_tests.bench_gemv --configs-out` writes them
    LLMC_MIXED_GRAPHS=0      small mixed/prefill steps run eagerly; decode steps keep their CUDA graphs
    LLMC_MOE_GROUPED=1|0     MoE experts through the grouped path / the reference loop (default: grouped on CUDA)
    LLMC_TP_ALLREDUCE=nccl   tensor-parallel all-reduce through NCCL instead of symmetric memory ("symm")
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping


@dataclass(frozen=True)
class Switches:
    no_fusion: bool = False
    gemv: bool = True
    gemv_max_m: int = 1
    gemv_max_m_quant: int = 16
    gemv_lm_head: bool = True
    gemv_configs: str | None = None
    mixed_graphs: bool = True
    moe_grouped: bool | None = None
    tp_allreduce: Literal["symm", "nccl"] = "symm"


def read(env: Mapping[str, str]) -> Switches:
    """The switches an environment sets; unset ones keep Switches' defaults (the one default of each)."""
    d = Switches()

    def flag(name: str, default: bool) -> bool:
        value = env.get(name)
        return default if value is None else value not in ("", "0")

    allreduce = env.get("LLMC_TP_ALLREDUCE", d.tp_allreduce)
    if allreduce not in ("symm", "nccl"):
        raise ValueError(f"LLMC_TP_ALLREDUCE must be symm or nccl, got {allreduce!r}")
    return Switches(
        no_fusion=flag("LLMC_NO_FUSION", d.no_fusion),
        gemv=flag("LLMC_GEMV", d.gemv),
        gemv_max_m=int(env.get("LLMC_GEMV_MAX_M", d.gemv_max_m)),
        gemv_max_m_quant=int(env.get("LLMC_GEMV_MAX_M_QUANT", d.gemv_max_m_quant)),
        gemv_lm_head=flag("LLMC_GEMV_LM_HEAD", d.gemv_lm_head),
        gemv_configs=env.get("LLMC_GEMV_CONFIGS") or d.gemv_configs,
        mixed_graphs=env.get("LLMC_MIXED_GRAPHS", "1") != "0",  # set but empty: on, as it always was
        moe_grouped={"1": True, "0": False}.get(env.get("LLMC_MOE_GROUPED", ""), d.moe_grouped),
        tp_allreduce=allreduce,
    )


SWITCHES = read(os.environ)
