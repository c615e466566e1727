"""Quantisation: which scheme an engine runs (`engine.quantization`, or what a pre-quantised checkpoint declares)
and which checkpoints it can load. Torch-free, so the launcher's early model check (cluster.model_check) and the
weight loader refuse exactly the same checkpoints without importing torch; the tensor code is in `quant.ops`.

Schemes (all weight storage is per output row: a [rows] float32 scale beside int8 or E4M3 rows):
- `int8`: weight-only, symmetric per-output-channel scales; activations stay in the model dtype.
- `fp8`: E4M3 weights with per-channel (default) or per-tensor scales. `fp8_scheme: w8a8` quantises activations
  per token at run time (dynamic scales) and multiplies in FP8 through `torch._scaled_mm`; `weight_only` upcasts
  the weights in the matmul. Decode rows (few) take the Triton GEMV either way, which reads the FP8 bytes.
- Pre-quantised FP8 checkpoints (compressed-tensors `float-quantized`, and the `fp8` quant_method without block
  scales) load their E4M3 weights and `weight_scale` as published; nothing is re-quantised.

Under tensor parallelism each rank quantises its own shard as it loads it: a column-parallel shard's rows have the
same scales as unsharded; a row-parallel shard's per-row scales cover only its columns (its partial sums are
dequantised before the all-reduce, so this is exact arithmetic, and no rank reads another's columns).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METHODS = ("none", "int8", "fp8")
SUPPORTED_CHECKPOINTS = ("fp8 (per-tensor or per-channel weight_scale)",
                         "compressed-tensors float-quantized (8-bit float weights, tensor or channel strategy)")


@dataclass(frozen=True)
class QuantScheme:
    method: str = "none"  # "none" | "int8" | "fp8"
    w8a8: bool = False  # fp8: activations quantised per token at run time, FP8 x FP8 matmul
    per_tensor: bool = False  # at-load fp8 quantisation: one scale per checkpoint tensor (shard) instead of per row
    prequantized: bool = False  # the checkpoint holds the quantised weights and their scales

    @property
    def quantized(self) -> bool:
        return self.method != "none"


def _unsupported(method: str, detail: str = "") -> ValueError:
    return ValueError(f"quantization method {method!r}{detail} is not supported (supported: "
                      f"{'; '.join(SUPPORTED_CHECKPOINTS)}; or an unquantised checkpoint with engine.quantization "
                      f"int8 or fp8)")


def checkpoint_method(cfg: dict) -> str | None:
    """The scheme a config.json's quantization_config asks for ("fp8"), None when it has none; ValueError naming the
    method (and what of it) when the engine cannot load it as published."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise _unsupported("unnamed")
    method = str(q.get("quant_method") or "unnamed")
    if method == "fp8":
        if q.get("weight_block_size"):
            raise _unsupported(method, f" with weight_block_size {q['weight_block_size']} (block-wise scales)")
        return "fp8"
    if method == "compressed-tensors":
        fmt = q.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise _unsupported(method, f" (format {fmt!r})")
        for name, group in (q.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("tensor", "channel"):
                raise _unsupported(method, f" ({name}: weights {w.get('num_bits')}-bit {w.get('type')}, strategy "
                                           f"{w.get('strategy')!r})")
            a = (group or {}).get("input_activations")
            if a and (a.get("type") != "float" or a.get("num_bits") != 8):
                raise _unsupported(method, f" ({name}: input activations {a.get('num_bits')}-bit {a.get('type')})")
        return "fp8"
    raise _unsupported(method)


def checkpoint_method_of_dir(model_dir: str | Path) -> str | None:
    return checkpoint_method(json.loads((Path(model_dir) / "config.json").read_text()))


def resolve(quantization: str, fp8_scheme: str = "w8a8", fp8_weight_scales: str = "channel",
            checkpoint: str | None = None) -> QuantScheme:
    """The scheme an engine runs: engine.quantization, or the checkpoint's own (which engine.quantization may only
    name again). ValueError naming the field otherwise."""
    if quantization not in METHODS:
        raise ValueError(f"engine.quantization: unknown value {quantization!r} (expected one of {', '.join(METHODS)})")
    if checkpoint is not None:
        if quantization not in ("none", checkpoint):
            raise ValueError(f"engine.quantization: {quantization} conflicts with the checkpoint, which is already "
                             f"quantised ({checkpoint}); set none or {checkpoint}")
        return QuantScheme(checkpoint, w8a8=fp8_scheme == "w8a8", prequantized=True)
    if quantization == "none":
        return QuantScheme()
    fp8 = quantization == "fp8"
    return QuantScheme(quantization, w8a8=fp8 and fp8_scheme == "w8a8",
                       per_tensor=fp8 and fp8_weight_scales == "tensor")
