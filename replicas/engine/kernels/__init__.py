"""GPU kernels (Triton). Imported only on CUDA code paths: the CPU build has no Triton."""
