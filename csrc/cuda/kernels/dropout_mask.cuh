// dropout_mask: out[e] = keep-bit of element e (philox.h's definition), for the flattened (rows, cols)
// mask; one element a thread in a grid-stride loop (256-thread blocks, at most 65535 of them).
#pragma once

#include "common.cuh"

namespace lorafa::cuda {

// Defined here for the one translation unit that launches it (lorafa_cuda.cu).
__global__ void dropout_mask_kernel(bool* __restrict__ out, int64_t numel,
                                    const int64_t* __restrict__ seed, uint32_t threshold) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = dropout_keep(s, static_cast<uint64_t>(e), threshold);
  }
}

}  // namespace lorafa::cuda
