"""Loading Hugging Face safetensors checkpoints (single file or sharded with an index) into our model.

Each tensor is opened as a safetensors slice and handed to its parameter's `weight_loader`, which reads
only this tensor-parallel rank's rows or columns; fused modules (qkv, gate_up) take a shard id.

Quantised weights (`replicas.engine.quant`) take the slice in the checkpoint's own dtype: their loader quantises
it, filling the weight's scale too, or copies FP8 rows as published, whose `weight_scale` then loads like any
tensor. A pre-quantised checkpoint's static activation scales (`input_scale`) are read past: activations are
quantised per token at run time. Its KV cache scales (`self_attn.k_scale` / `v_scale`) go to the attention layer.
"""
from __future__ import annotations

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


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` (a CausalLM) from the checkpoint; raise if any is left unset."""
    params = dict(model.named_parameters())
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
                target, shard_id = name, None
                for part, (fused, sid) in packed.items():
                    if f".{part}." in name:
                        target, shard_id = name.replace(part, fused), sid
                        break
                param = params.get(target)
                if param is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    if loader is None:  # replicated on every rank (norms)
                        param.data.copy_(f.get_tensor(name))
                    elif target.endswith(".weight_scale"):  # a scalar or one per row: small, read whole
                        loader(param, f.get_tensor(name), shard_id)
                    elif param.dtype in _QUANTIZED:
                        if loader(param, f.get_slice(name), shard_id):  # quantised here: its scale is set
                            loaded.add(f"{target}_scale:{shard_id}")
                    else:
                        if f.get_slice(name).get_dtype() in ("F8_E4M3", "I8"):
                            raise ValueError(f"checkpoint tensor {name!r} is quantised, but {target} is not "
                                             "(the engine quantises linear layers only)")
                        loader(param, _Cast(f.get_slice(name), param.dtype), shard_id)
                loaded.add(f"{target}:{shard_id}")
    expected = {f"{n}:{None}" for n in params}
    for part, (fused, sid) in packed.items():
        for n in params:
            if f".{fused}." in n:
                expected.discard(f"{n}:{None}")
                expected.add(f"{n}:{sid}")
    missing = sorted(expected - loaded)
    if missing:
        raise KeyError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")


class _Cast:
    """A safetensors slice whose reads come back in the parameter's dtype."""

    def __init__(self, sl, dtype: torch.dtype):
        self.sl, self.dtype = sl, dtype

    def get_shape(self) -> list[int]:
        return self.sl.get_shape()

    def __getitem__(self, idx) -> torch.Tensor:
        return self.sl[idx].to(self.dtype)
