"""ModelRunner: owns the model weights and the KV pool on one device (one tensor-parallel rank), and turns
a scheduled batch into one forward pass returning logits for the sequences that sample this step."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from replicas.engine.attention import AttentionMetadata
from replicas.engine.config import EngineConfig
from replicas.engine.models import CausalLM, ModelArgs, TPInfo
from replicas.engine.sequence import Sequence
from replicas.engine.weights import load_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype != "auto":
        return torch.device(device), _DTYPES[config.dtype]
    return torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, config: EngineConfig, args: ModelArgs, tp: TPInfo = TPInfo()):
        self.config = config
        self.block_size = config.block_size
        self.device, self.dtype = resolve_device_dtype(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        with _default_dtype(self.dtype), torch.device(self.device):
            self.model = CausalLM(args, tp).eval()
        load_weights(self.model, Path(config.model))
        self.num_kv_blocks = self._allocate_kv_cache(args, tp)

    def _allocate_kv_cache(self, args: ModelArgs, tp: TPInfo) -> int:
        attn = self.model.model.layers[0].self_attn
        per_block = (2 * args.num_layers * self.block_size * attn.num_kv_heads * attn.head_dim
                     * torch.finfo(self.dtype).bits // 8)
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * self.config.kv_memory_fraction) // per_block
        else:
            num_blocks = int(self.config.cpu_kv_cache_gib * 2**30) // per_block
        if num_blocks < 2:
            raise ValueError(f"KV cache too small: {num_blocks} blocks of {per_block} bytes")
        shape = (2, args.num_layers, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
        return num_blocks

    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute `num_tokens[i]` tokens of each `seqs[i]`; return the sequences whose prompt+output is
        now fully computed (they sample next) and their logits [R, V] (fp32). Call under inference_mode."""
        # Decodes first: the attention packs them into one batched call.
        order = sorted(range(len(seqs)), key=lambda i: num_tokens[i] != 1)
        ids, positions, starts, lengths, tables, sample_rows, samplers = [], [], [], [], [], [], []
        row = 0
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.append((start, start + n))
            starts.append(start)
            lengths.append(n)
            tables.append(seq.block_table)
            row += n
            if start + n == seq.num_tokens:
                sample_rows.append(row - 1)
                samplers.append(seq)
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.cat([torch.arange(a, b) for a, b in positions]).to(self.device, non_blocking=True)
        meta = AttentionMetadata.build(tables, starts, lengths, self.block_size, self.device)
        hidden = self.model(input_ids, pos, meta)
        if not samplers:
            return [], None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))
