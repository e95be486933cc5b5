// What the CUDA host code (lorafa_cuda.cu, launchers.cuh) asks of the device runtime, and nothing
// else: the current stream, the SM count, device memory and a cuBLAS GEMM. runtime.cu implements it
// on CUDA (ATen's current stream, caching allocator and cuBLAS handle); the test suite's emulated
// device implements it on the CPU (tests/emulator/runtime.cpp). The device guard is c10's generic
// one (KernelScope, ../lorafa.h).
#pragma once

#include <ATen/ATen.h>

#include "device.h"

namespace lorafa::cuda {

// The current stream of the current device: every kernel and GEMM runs on it.
cudaStream_t current_stream();

// Number of SMs of the current device.
int64_t sm_count();

// Uninitialised device memory for an output or a workspace (at::empty on CUDA).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// The arguments of one column-major cublasGemmEx call on the current stream and the current
// cuBLAS handle: C = alpha op(A) op(B) + beta C with op(A) (m, k), op(B) (k, n), C (m, n), each
// stored column-major with its leading dimension; dtype is that of A, B and C; fp32 accumulation
// (TF32 when ATen allows it for cuBLAS), fp64 for fp64. C is read only when beta != 0.
struct CublasGemm {
  bool trans_a, trans_b;
  int m, n, k;
  double alpha;
  const void* a;
  int lda;
  const void* b;
  int ldb;
  double beta;
  void* c;
  int ldc;
  at::ScalarType dtype;
};
void cublas_gemm(const CublasGemm& g);

}  // namespace lorafa::cuda
