// grad_b: dB[o, j] = alpha * sum_n dy[n, o] z[n, j] and dbias[o] = sum_n dy[n, o], reading dy once,
// in two deterministic steps with no atomics:
//   grad_b_partial_kernel: the rows are cut into splits (blockIdx.z); a block sums its split's rows
//     for 32 columns of dy x 32 ranks (kTile x kTile, 256 threads, 4 ranks a thread: tj, tj + 8, ...)
//     into fp32/fp64 partials, walking the rows in 32-row tiles of dy and z staged in shared memory.
//     Grid: (ceil(out / 32), ceil(R / 32) or 1 without dB, splits).
//   grad_b_reduce_kernel: sums the partials of each output in split order (grid-stride loop).
#pragma once

#include "common.cuh"

namespace lorafa::cuda {

// db_part[split][o][j] = sum_n dy[n, o] z[n, j] (db_part may be null), bias_part[split][o] =
// sum_n dy[n, o] (bias_part may be null; written by the blocks with blockIdx.y == 0), over the rows
// [split * rows_per_split, min(rows, (split + 1) * rows_per_split)). dy has row stride ldy and unit
// column stride; z is contiguous (rows, R).
template <typename YT, typename PT>
__global__ void __launch_bounds__(kThreads)
    grad_b_partial_kernel(const YT* __restrict__ dy, int64_t ldy, const PT* __restrict__ z,
                          acc_type<PT>* __restrict__ db_part, acc_type<PT>* __restrict__ bias_part,
                          int64_t rows, int64_t out, int64_t R, int64_t rows_per_split) {
  using acc_t = acc_type<PT>;
  __shared__ acc_t ys[kTile][kTile + 1];
  __shared__ acc_t zs[kTile][kTile + 1];
  const int tid = threadIdx.x, to = tid % kTile, tj = tid / kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * rows_per_split;
  const int64_t n_end = min(rows, n_begin + rows_per_split);
  const bool do_bias = bias_part != nullptr && blockIdx.y == 0;
  acc_t acc[4] = {0, 0, 0, 0};
  acc_t bsum = 0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    for (int i = tid; i < kTile * kTile; i += kThreads) {
      const int rr = i / kTile, cc = i % kTile;
      const int64_t n = n0 + rr, o = o0 + cc, j = j0 + cc;
      ys[rr][cc] = (n < n_end && o < out) ? static_cast<acc_t>(dy[n * ldy + o]) : acc_t(0);
      zs[rr][cc] =
          (db_part != nullptr && n < n_end && j < R) ? static_cast<acc_t>(z[n * R + j]) : acc_t(0);
    }
    __syncthreads();
    // Two-level sums, as in project: each 32-row tile into a fresh partial, then into the total.
    if (db_part != nullptr) {
      acc_t part[4] = {0, 0, 0, 0};
#pragma unroll 8
      for (int nn = 0; nn < kTile; ++nn) {
        const acc_t yv = ys[nn][to];
#pragma unroll
        for (int i = 0; i < 4; ++i) part[i] += yv * zs[nn][tj + 8 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += part[i];
    }
    if (do_bias && tj == 0) {
      acc_t part = 0;
      for (int nn = 0; nn < kTile; ++nn) part += ys[nn][to];
      bsum += part;
    }
    __syncthreads();
  }
  const int64_t o = o0 + to;
  if (o >= out) return;
  if (db_part != nullptr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = j0 + tj + 8 * i;
      if (j < R) db_part[(split * out + o) * R + j] = acc[i];
    }
  }
  if (do_bias && tj == 0) bias_part[split * out + o] = bsum;
}

// db = alpha * sum_split db_part[split] (db may be null), dbias = sum_split bias_part[split] (dbias
// may be null), each sum in split order: bitwise repeatable.
template <typename YT, typename PT>
__global__ void grad_b_reduce_kernel(const acc_type<PT>* __restrict__ db_part,
                                     const acc_type<PT>* __restrict__ bias_part,
                                     PT* __restrict__ db, YT* __restrict__ dbias, int64_t splits,
                                     int64_t out, int64_t R, acc_type<PT> alpha) {
  using acc_t = acc_type<PT>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (db != nullptr) {
    for (int64_t idx = first; idx < out * R; idx += stride) {
      acc_t sum = 0;
      for (int64_t sp = 0; sp < splits; ++sp) sum += db_part[sp * out * R + idx];
      db[idx] = static_cast<PT>(alpha * sum);
    }
  }
  if (dbias != nullptr) {
    for (int64_t idx = first; idx < out; idx += stride) {
      acc_t sum = 0;
      for (int64_t sp = 0; sp < splits; ++sp) sum += bias_part[sp * out + idx];
      dbias[idx] = static_cast<YT>(sum);
    }
  }
}

}  // namespace lorafa::cuda
