// project: out[n, j] = alpha * sum_k drop(X)[n, k] * P(j, k), the thin product of the low-rank path:
// z = drop(x) A^T (forward, with dropout or an fp32 A), t = s dy B (backward, fp32 B), A A^T (Gram
// matrix) and dB (A A^T)^-1 / s^2 (correction).
//
// Tiling: a block computes 32 rows x 32 ranks of out (kTile x kTile) with 256 threads, 4 outputs a
// thread (rows tn, tn + 8, tn + 16, tn + 24 of column tj). K is walked in 32-wide tiles of X and P
// staged in shared memory (rows padded to 33: no bank conflicts). Grid: (ceil(rows / 32),
// ceil(R / 32)).
#pragma once

#include "common.cuh"

namespace lorafa::cuda {

// X(n, k) = x[n*sx0 + k*sx1], P(j, k) = p[j*sp0 + k*sp1], out contiguous (rows, R). Each thread stages
// 4 consecutive k of one row, so one dropout_keep4 (one or two Philox calls) serves 4 elements. A
// dropped element is multiplied by 0 (inf or NaN stay NaN, as on the CPU). seed is read only with DROP.
template <typename XT, typename PT, bool DROP>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const XT* __restrict__ x, int64_t sx0, int64_t sx1, const PT* __restrict__ p,
                   int64_t sp0, int64_t sp1, PT* __restrict__ out, int64_t rows, int64_t R,
                   int64_t K, acc_type<PT> alpha, const int64_t* __restrict__ seed,
                   uint32_t threshold) {
  using acc_t = acc_type<PT>;
  __shared__ acc_t xs[kTile][kTile + 1];
  __shared__ acc_t ps[kTile][kTile + 1];
  const int tid = threadIdx.x, tj = tid % kTile, tn = tid / kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  uint64_t s = 0;
  if constexpr (DROP) s = static_cast<uint64_t>(*seed);
  acc_t acc[4] = {0, 0, 0, 0};
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    for (int i = tid; i < kTile * kTile / 4; i += kThreads) {
      const int rr = i / (kTile / 4), kq = (i % (kTile / 4)) * 4;
      const int64_t n = n0 + rr, j = j0 + rr, kb = k0 + kq;
      uint32_t keep = 0xF;
      if constexpr (DROP) {
        if (n < rows && kb < K) keep = dropout_keep4(s, static_cast<uint64_t>(n * K + kb), threshold);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = kb + q;
        acc_t v = 0;
        if (n < rows && k < K) {
          v = static_cast<acc_t>(x[n * sx0 + k * sx1]);
          if constexpr (DROP) v *= static_cast<acc_t>((keep >> q) & 1u);
        }
        xs[rr][kq + q] = v;
        ps[rr][kq + q] = (j < R && k < K) ? static_cast<acc_t>(p[j * sp0 + k * sp1]) : acc_t(0);
      }
    }
    __syncthreads();
    // Two-level sum: each K tile into a fresh partial, then into the total (the error of a K-long
    // running sum would grow like K; this keeps it near cuBLAS's blocked sums).
    acc_t part[4] = {0, 0, 0, 0};
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) {
      const acc_t a = ps[tj][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i) part[i] += xs[tn + 8 * i][kk] * a;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += part[i];
    __syncthreads();
  }
  const int64_t j = j0 + tj;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t n = n0 + tn + 8 * i;
    if (n < rows && j < R) out[n * R + j] = static_cast<PT>(acc[i] * alpha);
  }
}

}  // namespace lorafa::cuda
