// CPU kernels of the lorafa ops: ATen GEMMs (in-place accumulation, no separate scale/add passes)
// plus a parallel Philox loop for dropout.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <limits>

#include "../lorafa.h"
#include "../philox.h"

namespace lorafa::cpu {

namespace {

// Calls f(begin, end, keep) for the elements [begin, end) of a contiguous tensor of `numel` elements,
// in parallel, with keep(e) the dropout keep-bit of element e.
template <typename F>
void parallel_keep(int64_t numel, uint64_t seed, uint32_t threshold, const F& f) {
  at::parallel_for(0, (numel + 3) / 4, 2048, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const PhiloxWords r = philox4x32_10(static_cast<uint64_t>(c), seed);
      for (int64_t lane = 0; lane < 4 && 4 * c + lane < numel; ++lane) {
        f(4 * c + lane, r.w[lane] >= threshold);
      }
    }
  });
}

uint64_t seed_value(const std::optional<at::Tensor>& seed) {
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// drop(src) (kept elements scaled by 1/(1-p)) as a new contiguous tensor.
at::Tensor dropped(const at::Tensor& src_in, uint64_t seed, double p) {
  const at::Tensor src = src_in.contiguous();
  at::Tensor dst = at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "lorafa_drop", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    parallel_keep(src.numel(), seed, dropout_threshold(p), [&](int64_t e, bool keep) {
      out[e] = keep ? static_cast<scalar_t>(static_cast<acc_t>(in[e]) * scale) : scalar_t(0);
    });
  });
  return dst;
}

// dst += alpha * keep * src, element-wise over contiguous tensors of the same shape (dst may have a
// lower-precision dtype than src). p = 0 keeps every element.
void add_dropped(at::Tensor& dst, const at::Tensor& src, double alpha, uint64_t seed, double p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lorafa_add", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lorafa_add_src", [&] {
      using src_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<src_t, double>, double, float>;
      const acc_t a = static_cast<acc_t>(alpha);
      const src_t* in = src.const_data_ptr<src_t>();
      dst_t* out = dst.mutable_data_ptr<dst_t>();
      parallel_keep(dst.numel(), seed, dropout_threshold(p), [&](int64_t e, bool keep) {
        if (keep) out[e] = static_cast<dst_t>(static_cast<acc_t>(out[e]) + a * static_cast<acc_t>(in[e]));
      });
    });
  });
}

// Kernels run below autocast: the composite `linear` has already cast to the autocast dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace

Tensors2 linear_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scaling, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.linear_forward", x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  NoAutocast no_autocast;
  const int64_t out = weight.size(0), in = weight.size(1), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor x2 = x.reshape({rows, in});
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor xz = x2.to(zdt);
  if (dropout_p > 0.0) xz = dropped(xz, seed_value(seed), dropout_p);
  const at::Tensor z = at::mm(xz, lora_a.to(zdt).t());
  if (zdt == x.scalar_type()) {
    y.addmm_(z, lora_b.t(), /*beta=*/1.0, /*alpha=*/scaling);
  } else {
    add_dropped(y, at::mm(z, lora_b.to(zdt).t()), scaling, 0, 0.0);
  }
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  return {y.view(y_shape), z};
}

Tensors3 linear_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                         double dropout_p, const std::optional<at::Tensor>& seed,
                         std::array<bool, 3> output_mask) {
  check_backward("lorafa.linear_backward", grad_y, z, weight, lora_a, lora_b, scaling, dropout_p,
                 seed);
  NoAutocast no_autocast;
  const int64_t out = weight.size(0), in = weight.size(1), rows = flat_rows(grad_y);
  const auto zdt = z.scalar_type();
  const at::Tensor dy = grad_y.reshape({rows, out});
  const at::Tensor dyz = dy.to(zdt);
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0}), d_bias = grad_y.new_empty({0});
  if (output_mask[0]) {
    dx = at::mm(dy, weight);
    const at::Tensor t = at::mm(dyz, lora_b.to(zdt));
    if (dropout_p == 0.0 && zdt == dx.scalar_type()) {
      dx.addmm_(t, lora_a, /*beta=*/1.0, /*alpha=*/scaling);
    } else {
      const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
      add_dropped(dx, at::mm(t, lora_a.to(zdt)), scaling / (1.0 - dropout_p), s, dropout_p);
    }
    std::vector<int64_t> dx_shape(grad_y.sizes().begin(), grad_y.sizes().end());
    dx_shape.back() = in;
    dx = dx.view(dx_shape);
  }
  if (output_mask[1]) {
    d_b = at::mm(dyz.t(), z).mul_(scaling).to(lora_b.scalar_type());
  }
  if (output_mask[2]) {
    d_bias = dy.sum(0, /*keepdim=*/false, at::promote_types(dy.scalar_type(), at::kFloat))
                 .to(grad_y.scalar_type());
  }
  return {dx, d_b, d_bias};
}

at::Tensor gram_inverse(const at::Tensor& lora_a, double eps) {
  check_gram_inverse("lorafa.gram_inverse", lora_a, eps);
  NoAutocast no_autocast;
  const at::Tensor a = lora_a.to(gram_dtype(lora_a));
  at::Tensor g = at::mm(a, a.t());
  const int64_t r = g.size(0);
  const at::Tensor delta =
      at::clamp_min(g.trace() * (eps / static_cast<double>(r)), std::numeric_limits<float>::min());
  g.diagonal().add_(delta);
  const at::Tensor chol = std::get<0>(at::linalg_cholesky_ex(g));
  return at::cholesky_inverse(chol).contiguous();
}

at::Tensor correct_grad(const at::Tensor& grad_b, const at::Tensor& gram_inv, double scaling) {
  check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling);
  NoAutocast no_autocast;
  return at::mm(grad_b.to(gram_inv.scalar_type()), gram_inv)
      .mul_(1.0 / (scaling * scaling))
      .to(grad_b.scalar_type());
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_mask("lorafa.dropout_mask", seed, rows, cols, p);
  at::Tensor mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  parallel_keep(rows * cols, static_cast<uint64_t>(seed.item<int64_t>()), dropout_threshold(p),
                [&](int64_t e, bool keep) { out[e] = keep; });
  return mask;
}

}  // namespace lorafa::cpu
