#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md ("Engine (GPU)", "Tensor parallel, 2 x H200") in one call on the
# 2-GPU device machine, each step bounded by `timeout` with its log in $OUT/logs (steps.txt: exit codes and
# seconds; rc 124 = the step hung past its limit). Run from the repo root:
#   STEPS="env tests build tp1 tp2 tp2_nccl compare" bash load_tests/gpu_session.sh
# Everything under $OUT ends packed in $OUT/gpu_session.tgz (the device tool brings back few files).
set -u
OUT=${OUT:-/tmp/gpu-out}
L=$OUT/logs
M=${MODEL_DIR:-/dev/shm/m}
mkdir -p "$L"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# NVLink multicast stays off (the machine sets these too; keep them for every child process).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

step() {
  local name=$1 limit=$2 s rc
  shift 2
  s=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$L/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - s))s load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$L/steps.txt"
  tail -n 4 "$L/$name.log"
  return $rc
}

bench="python3 -m load_tests.bench_gpu --model-dir $M"  # a command line, not a function: `timeout` runs it

for s in ${STEPS:-env tests build tp1 tp2 tp2_nccl compare}; do
  case $s in
    env) step env 60 bash -c 'nvidia-smi; nvidia-smi topo -m; env | grep -E "NCCL|SYMM|NVSHMEM";
           python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"' ;;
    tests) step tests 200 python3 -m pytest tests/gpu/test_gpu_engine.py -x -q -rs -p no:cacheprovider ;;
    tptests) step tptests 200 python3 -m pytest tests/gpu/test_tp_gpu.py -x -v -rs -p no:cacheprovider ;;
    build) [ -f "$M/config.json" ] || step build 120 python3 -c \
             "from pathlib import Path; from load_tests.bench_gpu import build_model; build_model('llama3-8b', Path('$M'))" ;;
    # tp 1: decode, cached-prefix TTFT, and the teacher-forced reference (transformers fp32 after our engine).
    tp1) step tp1 240 $bench --sections teacher,decode,ttft --out-dir "$OUT/tp1" ;;
    # All single-GPU figures (parity, decode, TTFT, the 256-request workload), then the peers on the same GPU.
    single) step single 420 $bench --sections parity,decode,ttft,workload --out-dir "$OUT/single" ;;
    peers) step peers 420 env SIZE=8b RESULTS_DIR="$OUT/single" python3 load_tests/peer_engines.py ;;
    # Same-run peer of the TTFT figure: small mixed steps eager (no mixed-step graphs).
    ttft_eager) LLMC_MIXED_GRAPHS=0 step ttft_eager 150 $bench --sections ttft --out-dir "$OUT/ttft_eager" ;;
    # tp 2 with CUDA graphs and the one-shot all-reduce; its exit code shows a clean shutdown.
    tp2) step tp2 240 $bench --tp-size 2 --sections teacher,decode --teacher-ref "$OUT/tp1/bench_gpu.json" \
           --out-dir "$OUT/tp2" ;;
    # fp32 on the 8B shape: logit errors ~1e-4 against margins ~0.2, so nearly every position is decidable.
    tp1f) step tp1f 200 $bench --dtype float32 --sections teacher --out-dir "$OUT/tp1_fp32" ;;
    tp2f) step tp2f 200 $bench --dtype float32 --tp-size 2 --sections teacher \
            --teacher-ref "$OUT/tp1_fp32/bench_gpu.json" --out-dir "$OUT/tp2_fp32" ;;
    tp2_nccl) LLMC_TP_ALLREDUCE=nccl step tp2_nccl 180 $bench --tp-size 2 --sections decode --out-dir "$OUT/tp2_nccl" ;;
    profile1) step profile1 240 $bench --sections profile --out-dir "$OUT/profile1" ;;
    compare) step compare 60 bash -c "python3 -m load_tests.bench_gpu --compare $OUT/tp1/bench_gpu.json \
               $OUT/tp2/bench_gpu.json --out-dir $OUT/compare_symm; python3 -m load_tests.bench_gpu --compare \
               $OUT/tp1/bench_gpu.json $OUT/tp2_nccl/bench_gpu.json --out-dir $OUT/compare_nccl" ;;
    *) echo "unknown step $s" ;;
  esac
done
tar -C "$OUT" -czf /tmp/gpu_session.tgz --exclude='*.tgz' . && mv /tmp/gpu_session.tgz "$OUT/"
cat "$L/steps.txt"
