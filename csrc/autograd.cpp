// Autograd of `_linear` for the compiled library, as a C++ autograd::Function registered to the
// Autograd key. The formula is the one lorafa_ext/ops.py registers for the Python fallback; doing it
// here keeps the per-call host cost of a differentiable `linear` at a few microseconds (the Python
// torch.library.register_autograd path costs ~80 us a call, mostly in re-filling schema defaults).
// torch.compile traces through it like any C++ autograd kernel; the fakes come from ops.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include "lorafa.h"

namespace lorafa {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

const auto& linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(LORAFA_OP("_linear"), "")
                             .typed<Tensors2(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const at::Tensor&, const at::Tensor&, double, double,
                                             const OptTensor&, bool, double, const OptTensor&)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(LORAFA_OP("linear_backward"), "")
                             .typed<Tensors3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, double, double,
                                             const OptTensor&, std::array<bool, 3>)>();
  return op;
}

const auto& gram_inverse_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(LORAFA_OP("gram_inverse"), "")
                             .typed<at::Tensor(const at::Tensor&, double)>();
  return op;
}

const auto& correct_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(LORAFA_OP("correct_grad"), "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scaling, double dropout_p,
                               const OptTensor& seed, bool correction, double eps,
                               const OptTensor& gram_inv) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, z] = linear_op().call(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed,
                                   correction, eps, gram_inv);
    ctx->mark_non_differentiable({z});
    // Only z (N x r) is saved from the activations; the mask is regenerated from the seed.
    ctx->save_for_backward({z, weight, lora_a, lora_b, seed.value_or(at::Tensor()),
                            gram_inv.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["correction"] = correction;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &z = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the defined tensor inputs: x, weight, [bias], lora_a, lora_b, ...
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    const bool need_b = ctx->needs_input_grad(has_bias ? 4 : 3);
    auto [dx, d_b, d_bias] =
        backward_op().call(grads[0], z, weight, lora_a, lora_b, scaling,
                           ctx->saved_data["dropout_p"].toDouble(), optional_of(saved[4]),
                           {need_x, need_b, need_bias});
    if (need_b && ctx->saved_data["correction"].toBool()) {
      const at::Tensor gram_inv =
          saved[5].defined() ? saved[5] : gram_inverse_op().call(lora_a, eps);
      d_b = correct_grad_op().call(d_b, gram_inv, scaling);
    }
    const at::Tensor none;
    return {need_x ? dx : none, none, need_bias ? d_bias : none, none, need_b ? d_b : none,
            none, none, none, none, none, none};
  }
};

Tensors2 linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                         double dropout_p, const OptTensor& seed, bool correction, double eps,
                         const OptTensor& gram_inv) {
  auto out = LinearFunction::apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed,
                                   correction, eps, gram_inv);
  return {out[0], out[1]};
}

}  // namespace

LORAFA_LIBRARY_IMPL(Autograd, m) { m.impl("_linear", &linear_autograd); }

}  // namespace lorafa
