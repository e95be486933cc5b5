// The lorafa op library: every schema and the composite entry point `linear`. The backends register
// in their own files (cpu/lorafa_cpu.cpp, cuda/lorafa_cuda.cu), autograd in autograd.cpp, the fakes in
// lorafa_ext/ops.py.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <cmath>

#include "lorafa.h"

namespace lorafa {

namespace {

at::Tensor autocast_cast(const at::Tensor& t, at::ScalarType dtype) {
  const auto st = t.scalar_type();
  return (st == at::kFloat || st == at::kHalf || st == at::kBFloat16) ? t.to(dtype) : t;
}

// CompositeImplicitAutograd: checks what only autograd can see, applies autocast, draws the dropout
// seed, then calls the autograd-carrying `_linear`.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in, const at::Tensor& lora_a_in,
                  const at::Tensor& lora_b_in, double scaling, double dropout_p, bool correction,
                  std::optional<int64_t> seed, double eps,
                  const std::optional<at::Tensor>& gram_inv) {
  TORCH_CHECK(!weight_in.requires_grad(),
              "lorafa.linear: weight must not require grad (LoRA-FA freezes it)");
  TORCH_CHECK(!lora_a_in.requires_grad(),
              "lorafa.linear: lora_a must not require grad (LoRA-FA freezes it)");
  TORCH_CHECK(!correction || (std::isfinite(scaling) && scaling != 0.0),
              "lorafa.linear: correction needs a finite nonzero scaling, got ", scaling);
  at::Tensor x = x_in, weight = weight_in, lora_a = lora_a_in, lora_b = lora_b_in;
  std::optional<at::Tensor> bias = bias_in;
  const auto device_type = x.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    const auto dtype = at::autocast::get_autocast_dtype(device_type);
    x = autocast_cast(x, dtype);
    weight = autocast_cast(weight, dtype);
    lora_a = autocast_cast(lora_a, dtype);
    lora_b = autocast_cast(lora_b, dtype);
    if (bias.has_value()) bias = autocast_cast(*bias, dtype);
  }
  std::optional<at::Tensor> seed_t;
  if (dropout_p > 0.0) {
    const auto opts = x.options().dtype(at::kLong);
    seed_t = seed.has_value() ? at::full({}, *seed, opts) : at::randint(int64_t(1) << 62, {}, opts);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(LORAFA_OP("_linear"), "")
                       .typed<Tensors2(const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, const at::Tensor&,
                                       const at::Tensor&, double, double,
                                       const std::optional<at::Tensor>&, bool, double,
                                       const std::optional<at::Tensor>&)>();
  return std::get<0>(op.call(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_t,
                             correction, eps, gram_inv));
}

}  // namespace

LORAFA_LIBRARY(m) {
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
      "float dropout_p=0., bool correction=False, int? seed=None, float eps=1e-06, "
      "Tensor? gram_inv=None) -> Tensor");
  m.def(
      "_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
      "float dropout_p, Tensor? seed, bool correction, float eps, Tensor? gram_inv) "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)");
  m.def(
      "linear_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("gram_inverse(Tensor lora_a, float eps=1e-06) -> Tensor");
  m.def("correct_grad(Tensor grad_b, Tensor gram_inv, float scaling) -> Tensor");
  m.def("dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor");
  m.impl("linear", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(linear));
}

}  // namespace lorafa
