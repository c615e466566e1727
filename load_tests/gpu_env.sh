#!/usr/bin/env bash
# Runs one command on a GPU host that has torch and transformers but no package index, from the repo root:
# the project's other dependencies come as the wheels in .whl/ (../shared/tools/gpu_wheelhouse.sh builds them;
# the device call carries .whl), installed once per machine into $SITE.
#   bash load_tests/gpu_env.sh python -m load_tests.bench_e2e --shape llama3-8b --out $OUT/e2e
set -u
SITE=${SITE:-/tmp/site}
# NVLink multicast stays off (the machine sets these too; keep them for every child process).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d "$SITE/ray" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  .whl/*.whl || exit
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
# The image's interpreter is python3 (the one with torch); a bare `python` may not exist there.
if [ "${1:-}" = python ] && ! command -v python >/dev/null; then shift; set -- python3 "$@"; fi
exec "$@"
