// The device runtime of the CUDA host code (runtime.h) on CUDA: ATen's current stream, device
// properties, caching allocator and cuBLAS handle.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <cublas_v2.h>

#include "runtime.h"

namespace lorafa::cuda {

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

void cublas_gemm(const CublasGemm& g) {
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cudaDataType_t type;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  const float alpha_f = static_cast<float>(g.alpha), beta_f = static_cast<float>(g.beta);
  const void* alpha_p = &alpha_f;
  const void* beta_p = &beta_f;
  switch (g.dtype) {
    case at::kFloat:
      type = CUDA_R_32F;
      if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    case at::kHalf:
      type = CUDA_R_16F;
      break;
    case at::kBFloat16:
      type = CUDA_R_16BF;
      break;
    case at::kDouble:
      type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
      alpha_p = &g.alpha;
      beta_p = &g.beta;
      break;
    default:
      TORCH_CHECK(false, "lorafa: unsupported GEMM dtype ", g.dtype);
  }
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, g.m, g.n, g.k, alpha_p,
                                    g.a, type, g.lda, g.b, type, g.ldb, beta_p, g.c, type, g.ldc,
                                    compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace lorafa::cuda
