// The CUDA backend's host layer (csrc/cuda/lorafa_cuda.cu, with its launchers and kernels) compiled
// by the host compiler for the emulated device: registers LORAFA_NAMESPACE's kernels for CPU tensors.
#include "cuda/lorafa_cuda.cu"
