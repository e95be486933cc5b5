// C++ test of the lorafa ops through the dispatcher, as a libtorch user calls them: forward, backward,
// autograd through `linear`, the Gram inverse and the correction against plain ATen math in double
// precision, on the CPU.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = want.abs().max().item<double>() + 1e-30;
  const bool ok = err <= tol * scale;
  std::printf("%-28s rel err %.3e %s\n", what, err / scale, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const int64_t n = 37, in = 29, out = 23, r = 5;
  const double s = 0.75, p = 0.25;
  const auto f64 = torch::dtype(torch::kDouble);
  const at::Tensor x = torch::randn({n, in}, f64), w = torch::randn({out, in}, f64);
  const at::Tensor b = torch::randn({out}, f64), a = torch::randn({r, in}, f64);
  const at::Tensor lb = torch::randn({out, r}, f64), dy = torch::randn({n, out}, f64);
  const at::Tensor seed = torch::full({}, 1234, torch::dtype(torch::kLong));

  const auto mask = op("lorafa::dropout_mask")
                        .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, double)>()
                        .call(seed, n, in, p)
                        .to(at::kDouble);
  const double kept = mask.mean().item<double>();
  std::printf("%-28s %.3f (expect about %.2f)\n", "kept fraction", kept, 1.0 - p);
  if (std::abs(kept - (1.0 - p)) > 0.08) ++failures;
  const at::Tensor xd = x * mask / (1.0 - p);

  const auto fwd = op("lorafa::linear_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double, double,
                           const std::optional<at::Tensor>&)>();
  const auto [y, z] = fwd.call(x, w, b, a, lb, s, p, seed);
  const at::Tensor z_ref = xd.mm(a.t());
  expect_close("forward z", z, z_ref, 1e-12);
  expect_close("forward y", y, x.mm(w.t()) + b + s * z_ref.mm(lb.t()), 1e-12);

  const auto bwd = op("lorafa::linear_backward")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, double,
                           const std::optional<at::Tensor>&, std::array<bool, 3>)>();
  const auto [dx, d_b, d_bias] = bwd.call(dy, z, w, a, lb, s, p, seed, {true, true, true});
  expect_close("backward dx", dx, dy.mm(w) + s * dy.mm(lb).mm(a) * mask / (1.0 - p), 1e-12);
  expect_close("backward dB", d_b, s * dy.t().mm(z_ref), 1e-12);
  expect_close("backward dbias", d_bias, dy.sum(0), 1e-12);

  // `linear` carries autograd (csrc/autograd.cpp): gradients of x, B and the bias by backward().
  const auto linear = op("lorafa::linear")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const at::Tensor&,
                                            const at::Tensor&, double, double, bool,
                                            std::optional<int64_t>, double,
                                            const std::optional<at::Tensor>&)>();
  const at::Tensor xg = x.clone().requires_grad_(true), lbg = lb.clone().requires_grad_(true);
  const at::Tensor bg = b.clone().requires_grad_(true);
  linear.call(xg, w, bg, a, lbg, s, 0.0, false, std::nullopt, 1e-6, std::nullopt).backward(dy);
  const at::Tensor z_plain = x.mm(a.t());
  expect_close("autograd dx", xg.grad(), dy.mm(w) + s * dy.mm(lb).mm(a), 1e-12);
  expect_close("autograd dB", lbg.grad(), s * dy.t().mm(z_plain), 1e-12);
  expect_close("autograd dbias", bg.grad(), dy.sum(0), 1e-12);

  const double eps = 1e-6;
  const at::Tensor gi = op("lorafa::gram_inverse")
                            .typed<at::Tensor(const at::Tensor&, double)>()
                            .call(a, eps);
  const at::Tensor g = a.mm(a.t());
  const at::Tensor g_reg = g + eps * g.trace() / r * torch::eye(r, f64);
  expect_close("gram_inverse", gi, torch::linalg_inv(g_reg), 1e-10);
  const at::Tensor corrected = op("lorafa::correct_grad")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>()
                                   .call(d_b, gi, s);
  expect_close("correct_grad", corrected, d_b.mm(torch::linalg_inv(g_reg)) / (s * s), 1e-10);

  std::printf("%s\n", failures == 0 ? "all checks passed" : "some checks FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
