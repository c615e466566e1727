"""ModelRunner: owns the model weights and the KV pool on one device (one tensor-parallel rank), and turns
a scheduled batch into one forward pass returning logits for the sequences that sample this step."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from replicas.engine.attention import AttentionMetadata
from replicas.engine.config import EngineConfig
from replicas.engine.cuda_graphs import StepGraphs
from replicas.engine.envs import SWITCHES
from replicas.engine.models import CausalLM, ModelArgs, TPInfo
from replicas.engine.paged_metadata import build_step_tensors
from replicas.engine.quant import QuantScheme, checkpoint_method_of_dir, resolve
from replicas.engine.quant import ops as qops
from replicas.engine.sequence import Sequence
from replicas.engine.weights import load_weights

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass
class StepInputs:
    """One forward pass in plain ints: all a tensor-parallel worker rank needs to run the same step."""
    token_ids: list[int]  # packed tokens, decodes first
    starts: list[int]  # per sequence: position of its first token in this step
    lengths: list[int]  # per sequence: tokens computed this step
    block_tables: list[list[int]]
    sample_rows: list[int]  # rows of the packed batch whose logits are needed
    # longrope: per sequence, 1 where it rotates with the long factors (its context is past the original one)
    long_rope: list[int] = field(default_factory=list)


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype != "auto":
        return torch.device(device), _DTYPES[config.dtype]
    return torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32


def quant_scheme(config: EngineConfig) -> QuantScheme:
    """The weight quantisation this engine runs: engine.quantization, or a pre-quantised checkpoint's own."""
    return resolve(config.quantization, config.fp8_scheme, config.fp8_weight_scales,
                   checkpoint_method_of_dir(config.model))


def kv_budget_bytes(*, free: int, total: int, fraction: float, share: float | None, own: int) -> int:
    """Bytes for a GPU KV pool. A whole device (share None): `fraction` of what is free once the weights are
    loaded. A share of a device (replicas with a fractional num_gpus): share x total x fraction, less this
    replica's own weights and peak activations (`own`), whatever the other replicas on the device hold when this
    one starts, so equal shares get equal pools. Never more than `fraction` of what is free: an overcommitted
    device (a process beyond its share) gives a smaller pool rather than an out-of-memory error."""
    if share is None:
        return int(free * fraction)
    return max(0, min(int(share * total * fraction) - own, int(free * fraction)))


def long_rope(seq: Sequence, original: int) -> bool:
    """longrope's regime of a sequence: the long factors once its context passes the pretrained one, for every
    position (transformers' Phi-3 recomputes the whole cache when a generation crosses it: the engine does too,
    see LLMEngine._append_token)."""
    return seq.num_tokens > original


class ModelRunner:
    def __init__(self, config: EngineConfig, args: ModelArgs, tp: TPInfo = TPInfo()):
        self.config = config
        self.block_size = config.block_size
        self.device, self.dtype = resolve_device_dtype(config)
        if self.device.type == "cuda":
            if self.device.index is None:  # this process's current GPU (a TP worker rank picks its own)
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.quant = quant_scheme(config)
        self.kv_dtype = qops.FP8 if config.kv_cache_dtype == "fp8" else self.dtype
        with _default_dtype(self.dtype), torch.device(self.device), qops.building(self.quant):
            self.model = CausalLM(args, tp).eval()
        load_weights(self.model, Path(config.model))
        attn = self.model.model.layers[0].self_attn
        self.heads_per_kv = attn.num_heads // attn.num_kv_heads
        self.num_kv_heads = attn.num_kv_heads
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 0
        self.graphs = None  # set after the KV pool: a profiling step runs eagerly before it
        self.num_kv_blocks = self._allocate_kv_cache(args, tp)
        if self.device.type == "cuda" and not config.enforce_eager:
            max_len = config.max_model_len or args.max_position_embeddings
            self.graphs = StepGraphs(self.model, max_batch=config.max_num_seqs,
                                     max_tokens=config.max_num_batched_tokens,
                                     max_blocks_per_seq=-(-max_len // self.block_size), block_size=self.block_size,
                                     pad_slot=self.num_kv_blocks * self.block_size,
                                     heads_per_kv=self.heads_per_kv, num_kv_heads=attn.num_kv_heads,
                                     device=self.device, mixed=SWITCHES.mixed_graphs)

    def _allocate_kv_cache(self, args: ModelArgs, tp: TPInfo) -> int:
        attn = self.model.model.layers[0].self_attn
        per_block = (2 * args.num_layers * self.block_size * attn.num_kv_heads * attn.head_dim
                     * torch.finfo(self.kv_dtype).bits // 8)
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self._gpu_kv_budget(args) // per_block
        else:
            num_blocks = int(self.config.cpu_kv_cache_gib * 2**30) // per_block
        if tp.size > 1:  # every rank must hold every block id rank 0's block manager hands out
            n = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=tp.group)
            num_blocks = int(n)
        if num_blocks < 2:
            raise ValueError(f"KV cache too small: {num_blocks} blocks of {per_block} bytes")
        # GPU: one spare block past the pool takes the K/V writes of CUDA-graph padding rows.
        spare = 1 if self.device.type == "cuda" else 0
        self._set_kv_cache(args, num_blocks + spare)
        return num_blocks

    def _set_kv_cache(self, args: ModelArgs, num_blocks: int) -> None:
        attn = self.model.model.layers[0].self_attn
        shape = (2, args.num_layers, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]

    def _gpu_kv_budget(self, args: ModelArgs) -> int:
        """Bytes for the KV pool on this GPU (see `kv_budget_bytes`)."""
        share = self.config.gpu_share
        own = 0
        if share is not None:
            # Counted from the model, not from the allocator: the figure is this replica's alone even when
            # several engines share one process (tests), and it is the same for every replica of a model.
            weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            own = weights + self._profile_step_bytes(args)
        free, total = torch.cuda.mem_get_info(self.device)
        fraction = self.config.kv_memory_fraction
        if share is not None and int(free * fraction) < int(share * total * fraction) - own:
            log.warning("GPU share %.2f: the device has only %.1f GiB free, less than the share's KV budget; "
                        "the KV pool is sized from free memory (other processes use more than their shares)",
                        share, free / 2**30)
        return kv_budget_bytes(free=free, total=total, fraction=fraction, share=share, own=own)

    @torch.inference_mode()
    def _profile_step_bytes(self, args: ModelArgs) -> int:
        """Peak activation bytes of the largest step (a full token budget of prefill, logits for a full batch),
        run eagerly on a pool just big enough for it. Every TP rank runs it (the forward's collectives)."""
        tokens = min(self.config.max_num_batched_tokens, self.config.max_model_len or args.max_position_embeddings)
        blocks = -(-tokens // self.block_size)
        self._set_kv_cache(args, blocks)
        rows = min(tokens, self.config.max_num_seqs)
        step = StepInputs(token_ids=[0] * tokens, starts=[0], lengths=[tokens], block_tables=[list(range(blocks))],
                          sample_rows=list(range(tokens - rows, tokens)))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(step)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_cache = None  # release the profiling pool before the real one is sized
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return max(0, peak)

    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute `num_tokens[i]` tokens of each `seqs[i]`; return the sequences whose prompt+output is
        now fully computed (they sample next) and their logits [R, V] (fp32). Call under inference_mode."""
        step, samplers = self.prepare(seqs, num_tokens)
        return samplers, self.execute(step)

    def prepare(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[StepInputs, list[Sequence]]:
        # Decodes first: the attention packs them into one batched call.
        order = sorted(range(len(seqs)), key=lambda i: num_tokens[i] != 1)
        step = StepInputs([], [], [], [], [])
        samplers = []
        row = 0
        original = self.model.args.longrope_original
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start = seq.num_computed_tokens
            step.token_ids.extend(seq.token_ids[start:start + n])
            step.starts.append(start)
            step.lengths.append(n)
            step.block_tables.append(seq.block_table)
            if original:
                step.long_rope.append(int(long_rope(seq, original)))
            row += n
            if start + n == seq.num_tokens:
                step.sample_rows.append(row - 1)
                samplers.append(seq)
        return step, samplers

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """The forward pass of one step (on every TP rank); logits of `step.sample_rows`, None if none."""
        bucket = None if self.graphs is None else self.graphs.bucket_for(
            step.token_ids, step.starts, step.block_tables, len(step.sample_rows))
        if bucket is not None:
            shift = [f * self.model.rotary.long_offset for f in step.long_rope]
            logits = self.graphs.replay(bucket, step.token_ids, step.starts, step.lengths, step.block_tables,
                                        step.sample_rows, shift)
            return logits if step.sample_rows else None
        input_ids = torch.tensor(step.token_ids, dtype=torch.long).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            pos, slots, paged = build_step_tensors(step.block_tables, step.starts, step.lengths, self.block_size,
                                                   self.heads_per_kv, self.device, self.num_kv_heads, self.num_sms)
            meta = AttentionMetadata(slot_mapping=slots, paged=paged)
        else:
            pos = torch.cat([torch.arange(a, a + n) for a, n in zip(step.starts, step.lengths)])
            meta = AttentionMetadata.build(step.block_tables, step.starts, step.lengths, self.block_size,
                                           self.device, self.model.attention_windows)
        if step.long_rope and any(step.long_rope):
            offset = self.model.rotary.long_offset
            pos = pos + torch.repeat_interleave(torch.tensor(step.long_rope) * offset,
                                                torch.tensor(step.lengths)).to(pos.device)
        hidden = self.model(input_ids, pos, meta)
        if not step.sample_rows:
            return None
        rows = torch.tensor(step.sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))
