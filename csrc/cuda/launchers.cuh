// Launchers: from a plain params struct (pointers, sizes, strides, scalars; no at::Tensor) to the
// grid of a kernel in kernels/, through launch() (launch.h) on the current stream.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "kernels/dropout_mask.cuh"
#include "kernels/expand.cuh"
#include "kernels/grad_b.cuh"
#include "kernels/gram_invert.cuh"
#include "kernels/project.cuh"
#include "launch.h"
#include "runtime.h"

namespace lorafa::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CUDA's limits on a grid's y and z extents (x: 2^31 - 1).
constexpr int64_t kMaxGridYZ = 65535;

// ---- project (kernels/project.cuh) ---------------------------------------------------------------

template <typename XT, typename PT>
struct ProjectParams {
  const XT* x;
  int64_t sx0, sx1;  // X(n, k) = x[n*sx0 + k*sx1]
  const PT* p;
  int64_t sp0, sp1;  // P(j, k) = p[j*sp0 + k*sp1]
  PT* out;           // (rows, R), contiguous
  int64_t rows, R, K;
  double alpha;
  const int64_t* seed;  // the dropout seed (a device scalar); read only when dropout_p > 0
  double dropout_p;
};

template <typename XT, typename PT>
void launch_project(const ProjectParams<XT, PT>& p) {
  if (p.rows == 0 || p.R == 0) return;
  const int64_t gx = ceil_div(p.rows, kTile), gy = ceil_div(p.R, kTile);
  TORCH_CHECK(gx <= INT_MAX && gy <= kMaxGridYZ, "lorafa: project launch too large");
  const LaunchConfig config{dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                            dim3(kThreads), 0, current_stream(), kThreads};
  const auto alpha = static_cast<acc_type<PT>>(p.alpha);
  if (p.dropout_p > 0.0) {
    launch(config, project_kernel<XT, PT, true>, p.x, p.sx0, p.sx1, p.p, p.sp0, p.sp1, p.out, p.rows,
           p.R, p.K, alpha, p.seed, dropout_threshold(p.dropout_p));
  } else {
    launch(config, project_kernel<XT, PT, false>, p.x, p.sx0, p.sx1, p.p, p.sp0, p.sp1, p.out,
           p.rows, p.R, p.K, alpha, nullptr, 0u);
  }
}

// ---- expand (kernels/expand.cuh) -----------------------------------------------------------------

template <typename YT, typename PT>
struct ExpandParams {
  YT* y;            // (rows, C), contiguous
  const YT* bias;   // (C) or null
  const PT* z;      // (rows, R), contiguous
  const PT* q;
  int64_t sq0, sq1;  // Q(c, j) = q[c*sq0 + j*sq1]
  int64_t rows, C, R;
  double alpha;
  const int64_t* seed;  // the dropout seed (a device scalar); read only when dropout_p > 0
  double dropout_p;
};

template <typename YT, typename PT>
void launch_expand(const ExpandParams<YT, PT>& p) {
  if (p.rows == 0 || p.C == 0) return;
  const int64_t gx = ceil_div(p.rows, kExpTile), gy = ceil_div(p.C, kExpTile);
  TORCH_CHECK(gx <= INT_MAX && gy <= kMaxGridYZ, "lorafa: expand launch too large");
  const LaunchConfig config{dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                            dim3(kThreads), 0, current_stream(), kThreads};
  const auto alpha = static_cast<acc_type<PT>>(p.alpha);
  if (p.dropout_p > 0.0) {
    launch(config, expand_kernel<YT, PT, true>, p.y, p.bias, p.z, p.q, p.sq0, p.sq1, p.rows, p.C, p.R,
           alpha, p.seed, dropout_threshold(p.dropout_p));
  } else {
    launch(config, expand_kernel<YT, PT, false>, p.y, p.bias, p.z, p.q, p.sq0, p.sq1, p.rows, p.C,
           p.R, alpha, nullptr, 0u);
  }
}

// ---- grad_b (kernels/grad_b.cuh) -----------------------------------------------------------------

// How grad_b cuts the rows: `splits` splits of `rows_per_split` rows (a multiple of kTile, at least
// 4 kTile unless there are fewer rows), chosen so that there are about two blocks per SM.
struct GradBSplit {
  int64_t splits, rows_per_split;
};

inline GradBSplit grad_b_split(int64_t rows, int64_t out, int64_t R, bool with_db, int64_t sms) {
  const int64_t blocks_xy = ceil_div(out, kTile) * (with_db ? ceil_div(R, kTile) : 1);
  const int64_t want = std::max<int64_t>(1, ceil_div(2 * sms, blocks_xy));
  const int64_t splits_max = std::max<int64_t>(1, rows / (4 * kTile));  // >= 128 rows a split
  const int64_t rows_per_split =
      std::max<int64_t>(kTile, ceil_div(ceil_div(rows, std::min(want, splits_max)), kTile) * kTile);
  return {std::max<int64_t>(1, ceil_div(rows, rows_per_split)), rows_per_split};
}

template <typename YT, typename PT>
struct GradBParams {
  const YT* dy;
  int64_t ldy;      // dy (rows, out): row stride ldy, unit column stride
  const PT* z;      // (rows, R), contiguous
  PT* db;           // (out, R), or null: dB not wanted
  YT* dbias;        // (out), or null: dbias not wanted
  acc_type<PT>* db_part;    // workspace: splits * out * R (when db)
  acc_type<PT>* bias_part;  // workspace: splits * out (when dbias)
  int64_t rows, out, R;
  double alpha;
  GradBSplit split;  // grad_b_split(rows, out, R, db != nullptr, sm_count())
};

// dB = alpha dy^T z and dbias = colsum(dy): each split writes partials to the workspace, then
// grad_b_reduce_kernel adds them in split order.
template <typename YT, typename PT>
void launch_grad_b(const GradBParams<YT, PT>& p) {
  const int64_t gx = ceil_div(p.out, kTile), gy = p.db != nullptr ? ceil_div(p.R, kTile) : 1;
  TORCH_CHECK(gx <= INT_MAX && gy <= kMaxGridYZ && p.split.splits <= kMaxGridYZ,
              "lorafa.linear_backward: launch too large");
  const cudaStream_t stream = current_stream();
  const LaunchConfig partial{dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                                  static_cast<unsigned>(p.split.splits)),
                             dim3(kThreads), 0, stream, kThreads};
  launch(partial, grad_b_partial_kernel<YT, PT>, p.dy, p.ldy, p.z,
         p.db != nullptr ? p.db_part : nullptr, p.dbias != nullptr ? p.bias_part : nullptr, p.rows,
         p.out, p.R, p.split.rows_per_split);
  const int64_t work = p.db != nullptr ? p.out * p.R : p.out;
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), 4096);
  const LaunchConfig reduce{dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, 1024};
  launch(reduce, grad_b_reduce_kernel<YT, PT>, p.db_part, p.bias_part, p.db, p.dbias,
         p.split.splits, p.out, p.R, static_cast<acc_type<PT>>(p.alpha));
}

// ---- gram_invert (kernels/gram_invert.cuh) -------------------------------------------------------

// The largest r whose Gram inverse fits one block's shared memory without opting in: 6143 for
// fp32, 3071 for fp64.
template <typename G>
constexpr int64_t gram_invert_max_rank() {
  return static_cast<int64_t>((kMaxSharedBytes / sizeof(G) - 1) / 2);
}

// m (r, r), contiguous, SPD, r <= gram_invert_max_rank<G>(): m <- (m + delta I)^-1 in place.
template <typename G>
void launch_gram_invert(G* m, int64_t r, double eps) {
  const LaunchConfig config{dim3(1), dim3(1024), gram_invert_smem_bytes<G>(r), current_stream(),
                            1024};
  launch(config, gram_invert_kernel<G>, m, r, eps);
}

// ---- dropout_mask (kernels/dropout_mask.cuh) -----------------------------------------------------

inline void launch_dropout_mask(bool* out, int64_t numel, const int64_t* seed, double p) {
  if (numel == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), kMaxGridYZ);
  const LaunchConfig config{dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                            current_stream(), 1024};
  launch(config, dropout_mask_kernel, out, numel, seed, dropout_threshold(p));
}

}  // namespace lorafa::cuda
