"""Loading Hugging Face safetensors checkpoints (single file or sharded with an index) into our model.

Each tensor is opened as a safetensors slice and handed to its parameter's `weight_loader`, which reads
only this tensor-parallel rank's rows or columns; fused modules (qkv, gate_up) take a shard id.

Quantised weights (`replicas.engine.quant`) take the slice in the checkpoint's own dtype: their loader quantises
it, filling the weight's scale too, or copies FP8 rows as published, whose `weight_scale` then loads like any
tensor. A pre-quantised checkpoint's static activation scales (`input_scale`) are read past: activations are
quantised per token at run time. Its KV cache scales (`self_attn.k_scale` / `v_scale`) go to the attention layer.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from replicas.engine.checkpoint import checkpoint_files

# Checkpoint tensors we have no parameter for, by design (rotary tables are computed, not loaded; activation
# scales are dynamic).
_IGNORED = ("rotary_emb.inv_freq", ".input_scale")
_KV_SCALES = {".self_attn.k_scale": "k_scale", ".self_attn.v_scale": "v_scale",
              ".self_attn.k_proj.output_scale": "k_scale", ".self_attn.v_proj.output_scale": "v_scale"}
_QUANTIZED = (torch.int8, torch.float8_e4m3fn)
# Per-expert checkpoint tensors (Mixtral w1/w3/w2, Qwen-MoE gate/up/down) -> FusedExperts' w13 / w2.
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
                "w2": ("w2", None), "down_proj": ("w2", None)}


def _target(name: str, packed: dict) -> tuple[str, object]:
    """Our parameter name and shard id for a checkpoint tensor name."""
    m = _EXPERT.match(name)
    if m:
        param, part = _EXPERT_PART[m.group(3)]
        return f"{m.group(1)}.{param}", (int(m.group(2)), part)
    for part, (fused, sid) in packed.items():
        if f".{part}." in name:
            return name.replace(part, fused), sid
    return name, None


def _fused_layout(module: nn.Module) -> list[tuple[object, int]] | None:
    """A fused projection's checkpoint layout where a checkpoint stores it fused too (Phi-3's qkv_proj and
    gate_up_proj): [(shard id, rows in the full tensor)], in order."""
    from replicas.engine.models.layers import MergedColumnParallelLinear, QKVParallelLinear
    if isinstance(module, QKVParallelLinear):
        tp = module.tp.size
        q = module.num_heads * tp * module.head_dim
        kv = module.total_kv_heads * module.head_dim
        return [("q", q), ("k", kv), ("v", kv)]
    if isinstance(module, MergedColumnParallelLinear):
        return list(enumerate(module.output_sizes))
    return None


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` (a CausalLM) from the checkpoint; raise if any is left unset."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    packed = getattr(model, "packed_modules", {})
    tied = model.args.tie_word_embeddings
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED) or (tied and name == "lm_head.weight"):
                    continue
                if kv := next((k for k in _KV_SCALES if name.endswith(k)), None):
                    attn = model.get_submodule(name[:-len(kv)] + ".self_attn")
                    setattr(attn, _KV_SCALES[kv], float(f.get_tensor(name).float().max()))
                    continue
                target, shard_id = _target(name, packed)
                param = params.get(target)
                if param is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    if loader is None:  # replicated on every rank (norms, routers)
                        param.data.copy_(f.get_tensor(name))
                        loaded.add(f"{target}:{shard_id}")
                        continue
                    layout = _fused_layout(modules[target.rsplit(".", 1)[0]]) if shard_id is None else None
                    if target.endswith(".weight_scale"):  # a scalar or one per row: small, read whole
                        scale, offset = f.get_tensor(name), 0
                        for sid, rows in layout or [(shard_id, None)]:  # stored fused: each part's rows
                            part = scale if rows is None or scale.numel() == 1 else scale[offset:offset + rows]
                            offset += rows or 0
                            loader(param, part, sid)
                            loaded.add(f"{target}:{sid}")
                        continue
                    # Stored fused (Phi-3's qkv_proj, gate_up_proj): each part read as if it were its own tensor.
                    parts, offset = [], 0
                    for sid, rows in layout or [(shard_id, None)]:
                        parts.append((sid, offset, rows))
                        offset += rows or 0
                    for sid, start, rows in parts:
                        sl = f.get_slice(name)
                        raw = sl if rows is None else _Rows(sl, start, rows)
                        if param.dtype in _QUANTIZED:
                            if loader(param, raw, sid):  # quantised here: its scale is set
                                loaded.add(f"{target}_scale:{sid}")
                        else:
                            if sl.get_dtype() in ("F8_E4M3", "I8"):
                                raise ValueError(f"checkpoint tensor {name!r} is quantised, but {target} is not "
                                                 "(the engine quantises linear layers only)")
                            loader(param, _Cast(raw, param.dtype), sid)
                        loaded.add(f"{target}:{sid}")
    expected = {f"{n}:{None}" for n, p in params.items() if not hasattr(p, "shards")}
    expected |= {f"{n}:{sid}" for n, p in params.items() for sid in getattr(p, "shards", ())}
    for fused, sid in packed.values():
        for n in params:
            if f".{fused}." in n:
                expected.discard(f"{n}:{None}")
                expected.add(f"{n}:{sid}")
    missing = sorted(expected - loaded)
    if missing:
        raise KeyError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")


class _Rows:
    """Rows [offset, offset + rows) of a slice, indexed as a tensor of their own."""

    def __init__(self, sl, offset: int, rows: int):
        self.sl, self.offset, self.rows = sl, offset, rows

    def get_shape(self) -> list[int]:
        return [self.rows, *self.sl.get_shape()[1:]]

    def get_dtype(self) -> str:
        return self.sl.get_dtype()

    def __getitem__(self, idx) -> torch.Tensor:
        rows, rest = (idx[0], idx[1:]) if isinstance(idx, tuple) else (idx, ())
        start, stop, _ = rows.indices(self.rows)
        return self.sl[(slice(self.offset + start, self.offset + stop), *rest)]


class _Cast:
    """A safetensors slice whose reads come back in the parameter's dtype."""

    def __init__(self, sl, dtype: torch.dtype):
        self.sl, self.dtype = sl, dtype

    def get_shape(self) -> list[int]:
        return self.sl.get_shape()

    def __getitem__(self, idx) -> torch.Tensor:
        return self.sl[idx].to(self.dtype)
