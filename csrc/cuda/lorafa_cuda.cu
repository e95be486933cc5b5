// CUDA kernels of the lorafa ops.
//
// The two large products (x W^T forward, dy W backward) go to cuBLAS on the current stream, with
// beta = 1: they accumulate onto an output that `expand` has already filled with the bias and the
// low-rank term, so the output is written once by expand and read back inside the GEMM's epilogue
// (hidden under its compute) instead of making a separate read-modify-write pass. The low-rank work
// runs in hand-written kernels that fuse the dropout mask (Philox, regenerated from the seed), the
// scaling and the bias:
//   project:  out[n, j] = alpha * sum_k drop(X)[n, k] * P(j, k)   (z = drop(x) A^T, t = dy B, A A^T, ...)
//             (cuBLAS instead for z and t when there is no dropout and the dtypes match)
//   expand:   Y[n, c]   = bias[c] + alpha * keep(n, c) * sum_j Z[n, j] * Q(c, j)   (y, dx before the GEMM)
//   grad_b:   dB[o, j]  = alpha * sum_n dy[n, o] z[n, j], dbias[o] = sum_n dy[n, o]  (one read of dy;
//             split over rows, partials summed in a fixed order by a second kernel)
//   invert:   (G + delta I)^-1 for an SPD r x r G in one block (Gauss-Jordan; SPD needs no pivoting)
// Every reduction has a fixed order: results are bitwise repeatable, with no atomics and no host sync.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <type_traits>

#include "../lorafa.h"
#include "../philox.h"

namespace lorafa::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;      // project / grad_b tile edge
constexpr int kExpTile = 64;   // expand tile edge (rows and columns)

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[n, j] = alpha * sum_k drop(X)[n, k] * P(j, k), X(n, k) = x[n*sx0 + k*sx1],
// P(j, k) = p[j*sp0 + k*sp1], out contiguous (rows, R). Block: 32 rows x 32 ranks, 4 outputs a thread.
// Each thread stages 4 consecutive k of one row, so one dropout_keep4 (one or two Philox calls)
// serves 4 elements. A dropped element is multiplied by 0 (inf or NaN stay NaN, as on the CPU).
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

// Four consecutive outputs of one row, stored with one vector instruction.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Row offset of column c of expand's Q tile (rows of kTile + 1): columns c and c + 32 land 2 banks
// apart, so the 16 threads of a half-warp reading columns 4 tc + b hit 16 distinct banks.
__device__ __forceinline__ int q_index(int c, int jj) { return c * (kTile + 1) + (c / 32) * 2 + jj; }

// y[n, c] = bias[c] + alpha * keep(n*C + c) * sum_j z[n, j] * Q(c, j), y contiguous (rows, C),
// z contiguous (rows, R), Q(c, j) = q[c*sq0 + j*sq1]. Block: 64 x 64 outputs; a thread owns 4 rows
// x 4 consecutive columns, so one dropout_keep4 serves a row's 4 outputs and (C % 4 == 0) they are
// stored as one vector.
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

// Partial sums of dB = dy^T z and dbias = colsum(dy) over the rows of one split (blockIdx.z):
// db_part[split][o][j] = sum_n dy[n, o] z[n, j] (db_part may be null), bias_part[split][o] =
// sum_n dy[n, o] (bias_part may be null), reading dy once. Block: 32 columns of dy x 32 ranks.
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

// Sums the splits' partials in split order (deterministic): db = alpha * sum db_part, dbias = sum.
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

// In place: m <- (m + delta I)^-1, delta = max(eps * trace(m) / r, FLT_MIN), for an SPD r x r m.
// One block; Gauss-Jordan sweeps with the pivot row and column staged in shared memory.
template <typename G>
__global__ void gram_invert_kernel(G* __restrict__ m, int64_t r, double eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  G* rowk = reinterpret_cast<G*>(smem_raw);
  G* colk = rowk + r;
  __shared__ G delta;
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

__global__ void dropout_mask_kernel(bool* __restrict__ out, int64_t numel,
                                    const int64_t* __restrict__ seed, uint32_t threshold) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = dropout_keep(s, static_cast<uint64_t>(e), threshold);
  }
}

// ---- launchers -------------------------------------------------------------------------------------

const int64_t* seed_ptr(const std::optional<at::Tensor>& seed, double p) {
  return p > 0.0 ? seed->const_data_ptr<int64_t>() : nullptr;
}

template <typename XT, typename PT>
void launch_project(const XT* x, int64_t sx0, int64_t sx1, const PT* p, int64_t sp0, int64_t sp1,
                    PT* out, int64_t rows, int64_t R, int64_t K, double alpha,
                    const int64_t* seed, double dropout_p) {
  if (rows == 0 || R == 0) return;
  const dim3 grid(ceil_div(rows, kTile), ceil_div(R, kTile));
  TORCH_CHECK(grid.x <= INT_MAX && grid.y <= 65535, "lorafa: project launch too large");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto a = static_cast<acc_type<PT>>(alpha);
  if (dropout_p > 0.0) {
    project_kernel<XT, PT, true><<<grid, kThreads, 0, stream>>>(
        x, sx0, sx1, p, sp0, sp1, out, rows, R, K, a, seed, dropout_threshold(dropout_p));
  } else {
    project_kernel<XT, PT, false><<<grid, kThreads, 0, stream>>>(
        x, sx0, sx1, p, sp0, sp1, out, rows, R, K, a, nullptr, 0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename YT, typename PT>
void launch_expand(YT* y, const YT* bias, const PT* z, const PT* q, int64_t sq0, int64_t sq1,
                   int64_t rows, int64_t C, int64_t R, double alpha, const int64_t* seed,
                   double dropout_p) {
  if (rows == 0 || C == 0) return;
  const dim3 grid(ceil_div(rows, kExpTile), ceil_div(C, kExpTile));
  TORCH_CHECK(grid.x <= INT_MAX && grid.y <= 65535, "lorafa: expand launch too large");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto a = static_cast<acc_type<PT>>(alpha);
  if (dropout_p > 0.0) {
    expand_kernel<YT, PT, true><<<grid, kThreads, 0, stream>>>(
        y, bias, z, q, sq0, sq1, rows, C, R, a, seed, dropout_threshold(dropout_p));
  } else {
    expand_kernel<YT, PT, false><<<grid, kThreads, 0, stream>>>(y, bias, z, q, sq0, sq1, rows, C,
                                                                R, a, nullptr, 0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dB = alpha dy^T z (db may be null) and dbias = colsum(dy) (dbias may be null). The rows are cut
// into splits so that there are about two blocks per SM; each split writes partials to a workspace
// and a second kernel adds them in a fixed order: bitwise repeatable, no atomics.
template <typename YT, typename PT>
void launch_grad_b(const YT* dy, int64_t ldy, const PT* z, PT* db, YT* dbias, int64_t rows,
                   int64_t out, int64_t R, double alpha, const at::TensorOptions& z_options) {
  using acc_t = acc_type<PT>;
  const int64_t blocks_xy = ceil_div(out, kTile) * (db != nullptr ? ceil_div(R, kTile) : 1);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, ceil_div(2 * sms, blocks_xy));
  const int64_t splits_max = std::max<int64_t>(1, rows / (4 * kTile));  // >= 128 rows a split
  const int64_t rows_per_split =
      std::max<int64_t>(kTile, ceil_div(ceil_div(rows, std::min(want, splits_max)), kTile) * kTile);
  const int64_t splits = std::max<int64_t>(1, ceil_div(rows, rows_per_split));
  const dim3 grid(ceil_div(out, kTile), db != nullptr ? ceil_div(R, kTile) : 1, splits);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "lorafa.linear_backward: launch too large");
  const auto acc_options = z_options.dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor db_part = at::empty({db != nullptr ? splits * out * R : 0}, acc_options);
  at::Tensor bias_part = at::empty({dbias != nullptr ? splits * out : 0}, acc_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  grad_b_partial_kernel<YT, PT><<<grid, kThreads, 0, stream>>>(
      dy, ldy, z, db != nullptr ? db_part.mutable_data_ptr<acc_t>() : nullptr,
      dbias != nullptr ? bias_part.mutable_data_ptr<acc_t>() : nullptr, rows, out, R, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t work = db != nullptr ? out * R : out;
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), 4096);
  grad_b_reduce_kernel<YT, PT><<<blocks, kThreads, 0, stream>>>(
      db_part.const_data_ptr<acc_t>(), bias_part.const_data_ptr<acc_t>(), db, dbias, splits, out, R,
      static_cast<acc_t>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(XT{}, ZT{}) with XT the C++ type of x's dtype and ZT that of z's: x's or float.
template <typename F>
void dispatch_xz(at::ScalarType xt, at::ScalarType zt, const char* name, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "lorafa", [&] {
    using x_t = scalar_t;
    if (zt == xt) {
      f(x_t{}, x_t{});
    } else if constexpr (std::is_same_v<x_t, at::Half> || std::is_same_v<x_t, at::BFloat16>) {
      TORCH_CHECK(zt == at::kFloat, name, ": unsupported adapter dtype ", zt);
      f(x_t{}, float{});
    } else {
      TORCH_CHECK(false, name, ": unsupported dtypes ", xt, " / ", zt);
    }
  });
}

// Row-major GEMM on cuBLAS and the current stream: C[m, n] = alpha op(A)[m, k] @ op(B)[k, n] + beta C,
// where A is stored (m, k) row-major, or (k, m) when trans_a; likewise B. cuBLAS is column-major, so
// it computes C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const at::Tensor& a, int64_t lda, const at::Tensor& b, int64_t ldb, double beta,
          at::Tensor& c, int64_t ldc) {
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                  ldc <= INT_MAX,
              "lorafa: matrix dimension exceeds cuBLAS's int range");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0) c.zero_();
    return;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cudaDataType_t type;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  const void* alpha_p = &alpha_f;
  const void* beta_p = &beta_f;
  switch (c.scalar_type()) {
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
      alpha_p = &alpha;
      beta_p = &beta;
      break;
    default:
      TORCH_CHECK(false, "lorafa: unsupported GEMM dtype ", c.scalar_type());
  }
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, op_b, op_a, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), alpha_p,
      b.const_data_ptr(), type, static_cast<int>(ldb), a.const_data_ptr(), type,
      static_cast<int>(lda), beta_p, c.mutable_data_ptr(), type, static_cast<int>(ldc), compute,
      CUBLAS_GEMM_DEFAULT));
}

// A 2-D view cuBLAS and the kernels can read as is: unit column stride, row stride >= cols (a
// contiguous tensor's strides are arbitrary along size-1 dims: see row_stride).
at::Tensor gemm_operand(const at::Tensor& t) {
  const int64_t cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1)) return t;
  return t.contiguous();
}

// The leading dimension to give cuBLAS for a row-major 2-D operand from gemm_operand. With a single
// row the row stride is never used but may be anything (0 for an expanded gradient, 1 for a
// transposed column), and cuBLAS rejects a leading dimension below the column count.
int64_t row_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);
}

// Kernels run below autocast on the tensors' device.
struct Context {
  c10::cuda::CUDAGuard device;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  explicit Context(const at::Tensor& t) : device(t.device()) {}
};

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

}  // namespace

Tensors2 linear_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scaling, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.linear_forward", x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  Context ctx(x);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor x2 = gemm_operand(x.reshape({rows, in}));
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional(bias->contiguous()) : bias;
  // y is allocated in its final shape and filled through a 2-D view, so the op returns no view.
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = y.view({rows, out});
  at::Tensor z = at::empty({rows, r}, x.options().dtype(zdt));
  if (rows > 0) {
    // z = drop(x) A^T: cuBLAS when it is a plain product, else the project kernel (dropout, fp32 A).
    const bool blas_z = dropout_p == 0.0 && zdt == x.scalar_type();
    if (blas_z) gemm(false, true, rows, r, in, 1.0, x2, row_stride(x2), a, in, 0.0, z, r);
    dispatch_xz(x.scalar_type(), zdt, "lorafa.linear_forward", [&](auto xtag, auto ztag) {
      using XT = decltype(xtag);
      using ZT = decltype(ztag);
      if (!blas_z) {
        launch_project<XT, ZT>(x2.const_data_ptr<XT>(), x2.stride(0), x2.stride(1),
                               a.const_data_ptr<ZT>(), in, 1, z.mutable_data_ptr<ZT>(), rows, r,
                               in, 1.0 / (1.0 - dropout_p), seed_ptr(seed, dropout_p), dropout_p);
      }
      // y = bias + s z B^T ...
      launch_expand<XT, ZT>(y2.mutable_data_ptr<XT>(), bc ? bc->const_data_ptr<XT>() : nullptr,
                            z.const_data_ptr<ZT>(), b.const_data_ptr<ZT>(), r, 1, rows, out, r,
                            scaling, nullptr, 0.0);
    });
    // ... + x W^T.
    gemm(false, true, rows, out, in, 1.0, x2, row_stride(x2), w, row_stride(w), 1.0, y2, out);
  }
  return {y, z};
}

Tensors3 linear_backward(const at::Tensor& grad_y, const at::Tensor& z_in, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                         double dropout_p, const std::optional<at::Tensor>& seed,
                         std::array<bool, 3> output_mask) {
  check_backward("lorafa.linear_backward", grad_y, z_in, weight, lora_a, lora_b, scaling, dropout_p,
                 seed);
  Context ctx(grad_y);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const int64_t rows = flat_rows(grad_y);
  const auto zdt = z_in.scalar_type();
  const at::Tensor dy = gemm_operand(grad_y.reshape({rows, out}));
  const at::Tensor z = z_in.contiguous();
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0}), d_bias = grad_y.new_empty({0});
  at::Tensor db_z;  // dB in z's dtype, before the cast to lora_b's
  if (output_mask[0]) dx = at::empty(with_last(grad_y.sizes(), in), grad_y.options());
  if (output_mask[1]) db_z = at::empty({out, r}, z.options());
  if (output_mask[2]) d_bias = at::empty({out}, grad_y.options());
  dispatch_xz(grad_y.scalar_type(), zdt, "lorafa.linear_backward", [&](auto ytag, auto ztag) {
    using YT = decltype(ytag);
    using ZT = decltype(ztag);
    if (output_mask[0] && rows > 0) {
      // t = s dy B: cuBLAS when the dtypes match, else the project kernel.
      at::Tensor t = at::empty({rows, r}, z.options());
      if (zdt == grad_y.scalar_type()) {
        gemm(false, false, rows, r, out, scaling, dy, row_stride(dy), b, r, 0.0, t, r);
      } else {
        launch_project<YT, ZT>(dy.const_data_ptr<YT>(), dy.stride(0), 1, b.const_data_ptr<ZT>(), 1,
                               r, t.mutable_data_ptr<ZT>(), rows, r, out, scaling, nullptr, 0.0);
      }
      // dx = drop'(t A) ...
      at::Tensor dx2 = dx.view({rows, in});
      launch_expand<YT, ZT>(dx2.mutable_data_ptr<YT>(), nullptr, t.const_data_ptr<ZT>(),
                            a.const_data_ptr<ZT>(), 1, in, rows, in, r, 1.0 / (1.0 - dropout_p),
                            seed_ptr(seed, dropout_p), dropout_p);
      // ... + dy W.
      const at::Tensor w = weight.contiguous();
      gemm(false, false, rows, in, out, 1.0, dy, row_stride(dy), w, row_stride(w), 1.0, dx2, in);
    }
    if ((output_mask[1] || output_mask[2]) && out > 0) {
      launch_grad_b<YT, ZT>(dy.const_data_ptr<YT>(), dy.stride(0), z.const_data_ptr<ZT>(),
                            output_mask[1] ? db_z.mutable_data_ptr<ZT>() : nullptr,
                            output_mask[2] ? d_bias.mutable_data_ptr<YT>() : nullptr, rows, out, r,
                            scaling, z.options());
    }
  });
  if (output_mask[1]) d_b = db_z.to(lora_b.scalar_type());
  return {dx, d_b, d_bias};
}

at::Tensor gram_inverse(const at::Tensor& lora_a, double eps) {
  check_gram_inverse("lorafa.gram_inverse", lora_a, eps);
  Context ctx(lora_a);
  const int64_t r = lora_a.size(0), in = lora_a.size(1);
  const at::Tensor a = lora_a.to(gram_dtype(lora_a)).contiguous();
  at::Tensor g = at::empty({r, r}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lorafa.gram_inverse", [&] {
    const size_t smem = 2 * static_cast<size_t>(r) * sizeof(scalar_t);
    TORCH_CHECK(smem <= 48 * 1024, "lorafa.gram_inverse: rank r = ", r,
                " is too large for the CUDA kernel (at most ", 48 * 1024 / (2 * sizeof(scalar_t)),
                ")");
    launch_project<scalar_t, scalar_t>(a.const_data_ptr<scalar_t>(), in, 1,
                                       a.const_data_ptr<scalar_t>(), in, 1,
                                       g.mutable_data_ptr<scalar_t>(), r, r, in, 1.0, nullptr, 0.0);
    gram_invert_kernel<scalar_t><<<1, 1024, smem, at::cuda::getCurrentCUDAStream()>>>(
        g.mutable_data_ptr<scalar_t>(), r, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

at::Tensor correct_grad(const at::Tensor& grad_b, const at::Tensor& gram_inv, double scaling) {
  check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling);
  Context ctx(grad_b);
  const int64_t out = grad_b.size(0), r = grad_b.size(1);
  const at::Tensor gb = grad_b.to(gram_inv.scalar_type()).contiguous();
  const at::Tensor gi = gram_inv.contiguous();
  at::Tensor res = at::empty({out, r}, gi.options());
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "lorafa.correct_grad", [&] {
    // res[o, j] = sum_i gb[o, i] gi[i, j] / s^2: P(j, i) = gi[i * r + j].
    launch_project<scalar_t, scalar_t>(gb.const_data_ptr<scalar_t>(), r, 1,
                                       gi.const_data_ptr<scalar_t>(), 1, r,
                                       res.mutable_data_ptr<scalar_t>(), out, r, r,
                                       1.0 / (scaling * scaling), nullptr, 0.0);
  });
  return res.to(grad_b.scalar_type());
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_mask("lorafa.dropout_mask", seed, rows, cols, p);
  Context ctx(seed);
  at::Tensor mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const int64_t numel = rows * cols;
  if (numel > 0) {
    const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), 65535);
    dropout_mask_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        mask.mutable_data_ptr<bool>(), numel, seed.const_data_ptr<int64_t>(),
        dropout_threshold(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

namespace {

Tensors2 linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, double scaling, double dropout_p,
                     const std::optional<at::Tensor>& seed, bool /*correction*/, double /*eps*/,
                     const std::optional<at::Tensor>& /*gram_inv*/) {
  return linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafa, CUDA, m) {
  m.impl("_linear", &linear_cuda);
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
  m.impl("gram_inverse", &gram_inverse);
  m.impl("correct_grad", &correct_grad);
  m.impl("dropout_mask", &dropout_mask);
}

}  // namespace lorafa::cuda
