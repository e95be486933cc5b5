// The CUDA backend of the lorafa ops: the host layer. Each op checks its inputs, lays them out for
// the kernels, fills the launchers' params structs (launchers.cuh) and dispatches on the dtypes; the
// kernels themselves live in kernels/*.cuh.
//
// The two large products (x W^T forward, dy W backward) go to cuBLAS (gemm() below, on the current
// stream) with beta = 1: they accumulate onto an output that expand has already filled with the bias
// and the low-rank term, so the output is written once by expand and read back inside the GEMM's
// epilogue (hidden under its compute) instead of making a separate read-modify-write pass. The
// low-rank work runs in the hand-written kernels, which fuse the dropout mask (Philox, regenerated
// from the seed), the scaling and the bias:
//   project  z = drop(x) A^T (cuBLAS instead when there is no dropout and the dtypes match),
//            t = s dy B (cuBLAS instead when the dtypes match), A A^T, the correction
//   expand   y = bias + s z B^T (y = s z B^T for lowrank), dx = drop'(t A)
//   grad_b   dB = s dy^T z and dbias in one read of dy
//   gram_invert  (A A^T + delta I)^-1
// Every reduction has a fixed order: results are bitwise repeatable, with no atomics and no host sync.
//
// This file also compiles with the host compiler against the test suite's emulated device
// (LORAFA_EMULATED; tests/emulator/README.md), where it registers for CPU tensors in the
// LORAFA_NAMESPACE library instead of for CUDA tensors.
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../lorafa.h"
#include "launchers.cuh"
#include "runtime.h"

#if defined(LORAFA_EMULATED)
#define LORAFA_DEVICE_KEY CPU
#else
#define LORAFA_DEVICE_KEY CUDA
#endif

namespace lorafa::cuda {

namespace {

const int64_t* seed_ptr(const std::optional<at::Tensor>& seed, double p) {
  return p > 0.0 ? seed->const_data_ptr<int64_t>() : nullptr;
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
  cublas_gemm(CublasGemm{.trans_a = trans_b,
                         .trans_b = trans_a,
                         .m = static_cast<int>(n),
                         .n = static_cast<int>(m),
                         .k = static_cast<int>(k),
                         .alpha = alpha,
                         .a = b.const_data_ptr(),
                         .lda = static_cast<int>(ldb),
                         .b = a.const_data_ptr(),
                         .ldb = static_cast<int>(lda),
                         .beta = beta,
                         .c = c.mutable_data_ptr(),
                         .ldc = static_cast<int>(ldc),
                         .dtype = c.scalar_type()});
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

// z = drop(x2) A^T, z (rows, r) contiguous, a (r, in) contiguous in z's dtype: cuBLAS when it is a
// plain product, else the project kernel (dropout, fp32 A).
template <typename XT, typename ZT>
void project_z(const at::Tensor& x2, const at::Tensor& a, at::Tensor& z, double dropout_p,
               const std::optional<at::Tensor>& seed) {
  const int64_t rows = x2.size(0), in = x2.size(1), r = a.size(0);
  if (dropout_p == 0.0 && std::is_same_v<XT, ZT>) {
    gemm(false, true, rows, r, in, 1.0, x2, row_stride(x2), a, in, 0.0, z, r);
    return;
  }
  launch_project(ProjectParams<XT, ZT>{
      .x = x2.const_data_ptr<XT>(), .sx0 = x2.stride(0), .sx1 = x2.stride(1),
      .p = a.const_data_ptr<ZT>(), .sp0 = in, .sp1 = 1,
      .out = z.mutable_data_ptr<ZT>(), .rows = rows, .R = r, .K = in,
      .alpha = 1.0 / (1.0 - dropout_p), .seed = seed_ptr(seed, dropout_p),
      .dropout_p = dropout_p});
}

// dx2 = drop'(t A) with t = s dy B (written, not accumulated): dy (rows, out) from gemm_operand,
// a (r, in) and b (out, r) contiguous in z's dtype, dx2 (rows, in) contiguous.
template <typename YT, typename ZT>
void expand_dx(const at::Tensor& dy, const at::Tensor& a, const at::Tensor& b, at::Tensor& dx2,
               double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t rows = dy.size(0), out = dy.size(1), r = a.size(0), in = a.size(1);
  // t = s dy B: cuBLAS when the dtypes match, else the project kernel.
  at::Tensor t = empty({rows, r}, a.options());
  if (std::is_same_v<YT, ZT>) {
    gemm(false, false, rows, r, out, scaling, dy, row_stride(dy), b, r, 0.0, t, r);
  } else {
    launch_project(ProjectParams<YT, ZT>{
        .x = dy.const_data_ptr<YT>(), .sx0 = dy.stride(0), .sx1 = 1,
        .p = b.const_data_ptr<ZT>(), .sp0 = 1, .sp1 = r,
        .out = t.mutable_data_ptr<ZT>(), .rows = rows, .R = r, .K = out,
        .alpha = scaling, .seed = nullptr, .dropout_p = 0.0});
  }
  launch_expand(ExpandParams<YT, ZT>{
      .y = dx2.mutable_data_ptr<YT>(), .bias = nullptr, .z = t.const_data_ptr<ZT>(),
      .q = a.const_data_ptr<ZT>(), .sq0 = 1, .sq1 = in, .rows = rows, .C = in, .R = r,
      .alpha = 1.0 / (1.0 - dropout_p), .seed = seed_ptr(seed, dropout_p),
      .dropout_p = dropout_p});
}

// dB = s dy^T z into *db (out, r) in z's dtype and dbias = colsum(dy) into *dbias (out), each when
// not null: dy (rows, out) from gemm_operand, z (rows, r) contiguous, out > 0.
template <typename YT, typename ZT>
void grad_b(const at::Tensor& dy, const at::Tensor& z, at::Tensor* db, at::Tensor* dbias,
            double scaling) {
  using acc_t = acc_type<ZT>;
  const int64_t rows = dy.size(0), out = dy.size(1), r = z.size(1);
  const GradBSplit split = grad_b_split(rows, out, r, db != nullptr, sm_count());
  const auto acc_options = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor db_part = empty({db != nullptr ? split.splits * out * r : 0}, acc_options);
  at::Tensor bias_part = empty({dbias != nullptr ? split.splits * out : 0}, acc_options);
  launch_grad_b(GradBParams<YT, ZT>{
      .dy = dy.const_data_ptr<YT>(), .ldy = dy.stride(0), .z = z.const_data_ptr<ZT>(),
      .db = db != nullptr ? db->mutable_data_ptr<ZT>() : nullptr,
      .dbias = dbias != nullptr ? dbias->mutable_data_ptr<YT>() : nullptr,
      .db_part = db_part.mutable_data_ptr<acc_t>(),
      .bias_part = bias_part.mutable_data_ptr<acc_t>(), .rows = rows, .out = out, .R = r,
      .alpha = scaling, .split = split});
}

}  // namespace

Tensors2 linear_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scaling, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.linear_forward", x, &weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  KernelScope scope(x);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor x2 = gemm_operand(x.reshape({rows, in}));
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional(bias->contiguous()) : bias;
  // y is allocated in its final shape and filled through a 2-D view, so the op returns no view.
  at::Tensor y = empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = y.view({rows, out});
  at::Tensor z = empty({rows, r}, x.options().dtype(zdt));
  if (rows > 0) {
    dispatch_xz(x.scalar_type(), zdt, "lorafa.linear_forward", [&](auto xtag, auto ztag) {
      using XT = decltype(xtag);
      using ZT = decltype(ztag);
      project_z<XT, ZT>(x2, a, z, dropout_p, seed);
      // y = bias + s z B^T ...
      launch_expand(ExpandParams<XT, ZT>{
          .y = y2.mutable_data_ptr<XT>(), .bias = bc ? bc->const_data_ptr<XT>() : nullptr,
          .z = z.const_data_ptr<ZT>(), .q = b.const_data_ptr<ZT>(), .sq0 = r, .sq1 = 1,
          .rows = rows, .C = out, .R = r, .alpha = scaling, .seed = nullptr, .dropout_p = 0.0});
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
  check_backward("lorafa.linear_backward", grad_y, z_in, &weight, lora_a, lora_b, scaling, dropout_p,
                 seed);
  KernelScope scope(grad_y);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const int64_t rows = flat_rows(grad_y);
  const auto zdt = z_in.scalar_type();
  const at::Tensor dy = gemm_operand(grad_y.reshape({rows, out}));
  const at::Tensor z = z_in.contiguous();
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0}), d_bias = grad_y.new_empty({0});
  at::Tensor db_z;  // dB in z's dtype, before the cast to lora_b's
  if (output_mask[0]) dx = empty(with_last(grad_y.sizes(), in), grad_y.options());
  if (output_mask[1]) db_z = empty({out, r}, z.options());
  if (output_mask[2]) d_bias = empty({out}, grad_y.options());
  dispatch_xz(grad_y.scalar_type(), zdt, "lorafa.linear_backward", [&](auto ytag, auto ztag) {
    using YT = decltype(ytag);
    using ZT = decltype(ztag);
    if (output_mask[0] && rows > 0) {
      // dx = drop'(s dy B A) ...
      at::Tensor dx2 = dx.view({rows, in});
      expand_dx<YT, ZT>(dy, a, b, dx2, scaling, dropout_p, seed);
      // ... + dy W.
      const at::Tensor w = weight.contiguous();
      gemm(false, false, rows, in, out, 1.0, dy, row_stride(dy), w, row_stride(w), 1.0, dx2, in);
    }
    if ((output_mask[1] || output_mask[2]) && out > 0) {
      grad_b<YT, ZT>(dy, z, output_mask[1] ? &db_z : nullptr, output_mask[2] ? &d_bias : nullptr,
                     scaling);
    }
  });
  if (output_mask[1]) d_b = db_z.to(lora_b.scalar_type());
  return {dx, d_b, d_bias};
}

Tensors2 lowrank_forward(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.lowrank_forward", x, nullptr, std::nullopt, lora_a, lora_b, scaling,
                dropout_p, seed);
  KernelScope scope(x);
  const int64_t out = lora_b.size(0), in = lora_a.size(1), r = lora_a.size(0), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor x2 = gemm_operand(x.reshape({rows, in}));
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  at::Tensor y = empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = y.view({rows, out});
  at::Tensor z = empty({rows, r}, x.options().dtype(zdt));
  if (rows > 0) {
    dispatch_xz(x.scalar_type(), zdt, "lorafa.lowrank_forward", [&](auto xtag, auto ztag) {
      using XT = decltype(xtag);
      using ZT = decltype(ztag);
      project_z<XT, ZT>(x2, a, z, dropout_p, seed);
      // y = s z B^T.
      launch_expand(ExpandParams<XT, ZT>{
          .y = y2.mutable_data_ptr<XT>(), .bias = nullptr, .z = z.const_data_ptr<ZT>(),
          .q = b.const_data_ptr<ZT>(), .sq0 = r, .sq1 = 1, .rows = rows, .C = out, .R = r,
          .alpha = scaling, .seed = nullptr, .dropout_p = 0.0});
    });
  }
  return {y, z};
}

Tensors2 lowrank_backward(const at::Tensor& grad_y, const at::Tensor& z_in,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                          double dropout_p, const std::optional<at::Tensor>& seed,
                          std::array<bool, 2> output_mask) {
  check_backward("lorafa.lowrank_backward", grad_y, z_in, nullptr, lora_a, lora_b, scaling,
                 dropout_p, seed);
  KernelScope scope(grad_y);
  const int64_t out = lora_b.size(0), in = lora_a.size(1), r = lora_a.size(0);
  const int64_t rows = flat_rows(grad_y);
  const auto zdt = z_in.scalar_type();
  const at::Tensor dy = gemm_operand(grad_y.reshape({rows, out}));
  const at::Tensor z = z_in.contiguous();
  const at::Tensor a = lora_a.to(zdt).contiguous(), b = lora_b.to(zdt).contiguous();
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0});
  at::Tensor db_z;  // dB in z's dtype, before the cast to lora_b's
  if (output_mask[0]) dx = empty(with_last(grad_y.sizes(), in), grad_y.options());
  if (output_mask[1]) db_z = empty({out, r}, z.options());
  dispatch_xz(grad_y.scalar_type(), zdt, "lorafa.lowrank_backward", [&](auto ytag, auto ztag) {
    using YT = decltype(ytag);
    using ZT = decltype(ztag);
    if (output_mask[0] && rows > 0) {
      at::Tensor dx2 = dx.view({rows, in});
      expand_dx<YT, ZT>(dy, a, b, dx2, scaling, dropout_p, seed);
    }
    if (output_mask[1] && out > 0) grad_b<YT, ZT>(dy, z, &db_z, nullptr, scaling);
  });
  if (output_mask[1]) d_b = db_z.to(lora_b.scalar_type());
  return {dx, d_b};
}

at::Tensor gram_inverse(const at::Tensor& lora_a, double eps) {
  check_gram_inverse("lorafa.gram_inverse", lora_a, eps);
  KernelScope scope(lora_a);
  const int64_t r = lora_a.size(0), in = lora_a.size(1);
  const at::Tensor a = lora_a.to(gram_dtype(lora_a)).contiguous();
  at::Tensor g = empty({r, r}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lorafa.gram_inverse", [&] {
    TORCH_CHECK(r <= gram_invert_max_rank<scalar_t>(), "lorafa.gram_inverse: rank r = ", r,
                " is too large for the CUDA kernel (at most ", gram_invert_max_rank<scalar_t>(),
                " for ", a.scalar_type(), ")");
    launch_project(ProjectParams<scalar_t, scalar_t>{
        .x = a.const_data_ptr<scalar_t>(), .sx0 = in, .sx1 = 1,
        .p = a.const_data_ptr<scalar_t>(), .sp0 = in, .sp1 = 1,
        .out = g.mutable_data_ptr<scalar_t>(), .rows = r, .R = r, .K = in, .alpha = 1.0,
        .seed = nullptr, .dropout_p = 0.0});
    launch_gram_invert(g.mutable_data_ptr<scalar_t>(), r, eps);
  });
  return g;
}

at::Tensor correct_grad(const at::Tensor& grad_b, const at::Tensor& gram_inv, double scaling) {
  check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling);
  KernelScope scope(grad_b);
  const int64_t out = grad_b.size(0), r = grad_b.size(1);
  const at::Tensor gb = grad_b.to(gram_inv.scalar_type()).contiguous();
  const at::Tensor gi = gram_inv.contiguous();
  at::Tensor res = empty({out, r}, gi.options());
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "lorafa.correct_grad", [&] {
    // res[o, j] = sum_i gb[o, i] gi[i, j] / s^2: P(j, i) = gi[i * r + j].
    launch_project(ProjectParams<scalar_t, scalar_t>{
        .x = gb.const_data_ptr<scalar_t>(), .sx0 = r, .sx1 = 1,
        .p = gi.const_data_ptr<scalar_t>(), .sp0 = 1, .sp1 = r,
        .out = res.mutable_data_ptr<scalar_t>(), .rows = out, .R = r, .K = r,
        .alpha = 1.0 / (scaling * scaling), .seed = nullptr, .dropout_p = 0.0});
  });
  return res.to(grad_b.scalar_type());
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_mask("lorafa.dropout_mask", seed, rows, cols, p);
  KernelScope scope(seed);
  at::Tensor mask = empty({rows, cols}, seed.options().dtype(at::kBool));
  launch_dropout_mask(mask.mutable_data_ptr<bool>(), rows * cols, seed.const_data_ptr<int64_t>(), p);
  return mask;
}

}  // namespace lorafa::cuda

LORAFA_LIBRARY_IMPL(LORAFA_DEVICE_KEY, m) { LORAFA_REGISTER_BACKEND(m, lorafa::cuda); }
