// gram_invert: m <- (m + delta I)^-1 in place, delta = max(eps * trace(m) / r, FLT_MIN), for an SPD
// r x r matrix m (the Gram matrix A A^T from project).
//
// Tiling: one block (up to 1024 threads) runs r Gauss-Jordan sweeps over the whole matrix (SPD: no
// pivoting); sweep k stages the pivot row and column in dynamic shared memory, then updates every
// element in a block-stride loop. Shared memory (all dynamic, so the launch sizes it exactly):
// rowk[r], colk[r], delta: gram_invert_smem_bytes(r) bytes.
#pragma once

#include <cfloat>
#include <cstddef>

#include "common.cuh"

namespace lorafa::cuda {

template <typename G>
constexpr size_t gram_invert_smem_bytes(int64_t r) {
  return (2 * static_cast<size_t>(r) + 1) * sizeof(G);
}

template <typename G>
__global__ void gram_invert_kernel(G* __restrict__ m, int64_t r, double eps) {
  G* rowk = dynamic_smem<G>();
  G* colk = rowk + r;
  G& delta = colk[r];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  if (tid == 0) {
    G trace = 0;
    for (int64_t i = 0; i < r; ++i) trace += m[i * r + i];
    delta = max(trace * static_cast<G>(eps / static_cast<double>(r)), static_cast<G>(FLT_MIN));
  }
  __syncthreads();
  for (int64_t i = tid; i < r; i += nthreads) m[i * r + i] += delta;
  __syncthreads();
  for (int64_t k = 0; k < r; ++k) {
    const G inv_pivot = G(1) / m[k * r + k];
    for (int64_t j = tid; j < r; j += nthreads) {
      rowk[j] = j == k ? inv_pivot : m[k * r + j] * inv_pivot;
      colk[j] = m[j * r + k];
    }
    __syncthreads();
    for (int64_t idx = tid; idx < r * r; idx += nthreads) {
      const int64_t i = idx / r, j = idx % r;
      if (i == k) {
        m[idx] = rowk[j];
      } else if (j == k) {
        m[idx] = -colk[i] * inv_pivot;
      } else {
        m[idx] -= colk[i] * rowk[j];
      }
    }
    __syncthreads();
  }
}

}  // namespace lorafa::cuda
