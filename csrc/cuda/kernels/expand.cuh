// expand: Y[n, c] = bias[c] + alpha * keep(n, c) * sum_j Z[n, j] * Q(c, j), the wide product of the
// low-rank path, written once: y = bias + s z B^T before the GEMM adds x W^T (forward), and
// dx = drop'(t A) / (1 - p) before the GEMM adds dy W (backward).
//
// Tiling: a block computes 64 rows x 64 columns of Y (kExpTile x kExpTile) with 256 threads; a
// thread owns 4 rows x 4 consecutive columns (rows 4 tr .. 4 tr + 3, columns 4 tc .. 4 tc + 3), so
// one dropout_keep4 serves a row's 4 outputs and (C % 4 == 0) they are stored as one vector. The
// rank is walked in 32-deep tiles of Z and Q staged in shared memory. Grid: (ceil(rows / 64),
// ceil(C / 64)).
#pragma once

#include "common.cuh"

namespace lorafa::cuda {

// Four consecutive outputs of one row, stored with one vector instruction.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Row offset of column c of expand's Q tile (rows of kTile + 1): columns c and c + 32 land 2 banks
// apart, so the 16 threads of a half-warp reading columns 4 tc + b hit 16 distinct banks.
__device__ __forceinline__ int q_index(int c, int jj) { return c * (kTile + 1) + (c / 32) * 2 + jj; }

// y contiguous (rows, C), z contiguous (rows, R), Q(c, j) = q[c*sq0 + j*sq1], bias null or (C);
// keep(n, c) is the dropout keep-bit of element n*C + c (seed read only with DROP).
template <typename YT, typename PT, bool DROP>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(YT* __restrict__ y, const YT* __restrict__ bias, const PT* __restrict__ z,
                  const PT* __restrict__ q, int64_t sq0, int64_t sq1, int64_t rows, int64_t C,
                  int64_t R, acc_type<PT> alpha, const int64_t* __restrict__ seed,
                  uint32_t threshold) {
  using acc_t = acc_type<PT>;
  __shared__ acc_t zs[kExpTile][kTile + 1];
  __shared__ acc_t qs[kExpTile * (kTile + 1) + 2 * (kExpTile / 32)];
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kExpTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kExpTile;
  acc_t acc[4][4] = {};
  for (int64_t j0 = 0; j0 < R; j0 += kTile) {
    for (int i = tid; i < kExpTile * kTile; i += kThreads) {
      const int rr = i / kTile, jj = i % kTile;
      const int64_t n = n0 + rr, c = c0 + rr, j = j0 + jj;
      zs[rr][jj] = (n < rows && j < R) ? static_cast<acc_t>(z[n * R + j]) : acc_t(0);
      qs[q_index(rr, jj)] = (c < C && j < R) ? static_cast<acc_t>(q[c * sq0 + j * sq1]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kTile; ++jj) {
      acc_t zv[4], qv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) zv[a] = zs[tr * 4 + a][jj];
#pragma unroll
      for (int b = 0; b < 4; ++b) qv[b] = qs[q_index(tc * 4 + b, jj)];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += zv[a] * qv[b];
    }
    __syncthreads();
  }
  uint64_t s = 0;
  if constexpr (DROP) s = static_cast<uint64_t>(*seed);
  const int64_t cb = c0 + tc * 4;
  const bool vector_store = (C % 4 == 0) && (reinterpret_cast<uintptr_t>(y) % sizeof(Pack4<YT>) == 0);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t n = n0 + tr * 4 + a;
    if (n >= rows || cb >= C) continue;
    uint32_t keep = 0xF;
    if constexpr (DROP) keep = dropout_keep4(s, static_cast<uint64_t>(n * C + cb), threshold);
    Pack4<YT> pack;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      acc_t v = acc[a][b] * alpha;
      if constexpr (DROP) v *= static_cast<acc_t>((keep >> b) & 1u);
      if (bias != nullptr && cb + b < C) v += static_cast<acc_t>(bias[cb + b]);
      pack.v[b] = static_cast<YT>(v);
    }
    if (vector_store) {
      *reinterpret_cast<Pack4<YT>*>(y + n * C + cb) = pack;
    } else {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        if (cb + b < C) y[n * C + cb + b] = pack.v[b];
      }
    }
  }
}

}  // namespace lorafa::cuda
