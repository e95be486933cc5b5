// The CUDA vocabulary the kernels use: with nvcc, CUDA itself; in a host-compiler build with
// LORAFA_EMULATED defined, the test suite's emulated device (tests/emulator/simt.h), which gives the
// same words (__global__, __device__, __shared__, threadIdx, blockIdx, blockDim, gridDim,
// __syncthreads, dim3, cudaStream_t, min, max) host meanings, so the kernel headers compile and run
// unchanged on the CPU. A CUDA feature the emulator lacks fails that build by name.
//
// Besides those words the kernels use only dynamic_smem<T>(): the block's dynamic shared memory, as
// sized by the launch (16-byte aligned).
#pragma once

#if defined(__CUDACC__)

#include <cuda_runtime.h>

namespace lorafa::cuda {

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lorafa_dynamic_smem[];
  return reinterpret_cast<T*>(lorafa_dynamic_smem);
}

}  // namespace lorafa::cuda

#elif defined(LORAFA_EMULATED)

#include "simt.h"

#else
#error "csrc/cuda/device.h needs nvcc, or LORAFA_EMULATED and the emulator on the include path"
#endif
