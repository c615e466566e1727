# Vendored from ../shared/bench/peer_engines.py (the project's peer-engine reference script, DESIGN.md "Performance"),
# unchanged below this header, so it travels to GPU hosts with the repo. Run: SIZE=8b RESULTS_DIR=$OUT python3 load_tests/peer_engines.py
"""Peer engines on a CUDA GPU, for side-by-side comparison with llm-cluster's engine:
HF generate (static batch) and transformers continuous batching, with a Llama-3-8B-shaped
bf16 model of random weights. Env: SIZE=8b|1b, CB_N=requests; writes RESULTS_DIR/peers_SIZE.json when set."""
import json
import os
import time
import traceback

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

out = {}
def log(k, v):
    out[k] = v; print(k, v, flush=True)

log("torch", torch.__version__); log("transformers", transformers.__version__)
log("gpu", torch.cuda.get_device_name(0))
# bandwidth ceiling
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
log("d2d_GBps_rw", round(2 * x.numel() / dt / 1e9))
del x, y

size = os.environ.get("SIZE", "8b")
if size == "8b":
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
else:
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
torch.manual_seed(0)
t = time.perf_counter()
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
model.eval()
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
log("weights_GB", round(nbytes / 1e9, 2)); log("init_s", round(time.perf_counter() - t, 1))
V = cfg.vocab_size
gen = torch.Generator().manual_seed(1)

def hf_generate(bs, prompt_len, new):
    ids = torch.randint(100, V - 100, (bs, prompt_len), generator=gen).cuda()
    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))  # warm
    torch.cuda.synchronize(); t = time.perf_counter()
    model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    return dt

try:
    dt = hf_generate(1, 128, 128)
    log("hf_generate_bs1_ms_per_token", round(dt / 128 * 1000, 2))
    log("floor_ms_per_step_bs1", round(nbytes / (out["d2d_GBps_rw"] * 1e9) * 1000, 2))
except Exception:
    traceback.print_exc()
for bs in (32, 128):
    try:
        dt = hf_generate(bs, 512, 128)
        log(f"hf_generate_bs{bs}_in512_out128_tok_per_s", round(bs * 128 / dt))
    except Exception:
        traceback.print_exc()

# transformers continuous batching
N = int(os.environ.get("CB_N", "256"))
prompts = [torch.randint(100, V - 100, (int(torch.randint(256, 1024, (1,), generator=gen)),), generator=gen).tolist() for _ in range(N)]
log("cb_prompt_tokens", sum(len(p) for p in prompts))
log("has_generate_batch", hasattr(model, "generate_batch"))
for impl in ("paged|sdpa", "paged|eager"):
    try:
        model.set_attn_implementation(impl) if hasattr(model, "set_attn_implementation") else setattr(model.config, "_attn_implementation", impl)
        gc = GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None,
                              max_batch_tokens=4096, num_blocks=4096, block_size=128)
        model.generate_batch(inputs=prompts[:8], generation_config=gc)  # warm
        torch.cuda.synchronize(); t = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=gc)
        torch.cuda.synchronize(); dt = time.perf_counter() - t
        ntok = sum(len(r.generated_tokens) for r in res.values())
        log(f"cb_{impl}_N{N}_in256-1024_out128_out_tok_per_s", round(ntok / dt))
        log(f"cb_{impl}_wall_s", round(dt, 1))
        break
    except Exception as e:
        print("impl failed", impl, repr(e)[:300], flush=True)
        traceback.print_exc(limit=3)
od = os.environ.get("RESULTS_DIR")
if od:
    json.dump(out, open(os.path.join(od, f"peers_{size}.json"), "w"), indent=1)
print(json.dumps(out))
