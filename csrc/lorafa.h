// Declarations shared by the op registrations (ops.cpp, autograd.cpp) and the CPU and CUDA backends.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

// The op namespace, torch.ops.<LORAFA_NAMESPACE>: `lorafa`, or another name for a second build of the
// same sources that must not collide with it (the test suite's emulated CUDA device builds them as
// `lorafa_emulated`). LORAFA_OP("name") is the qualified name "<namespace>::name".
#ifndef LORAFA_NAMESPACE
#define LORAFA_NAMESPACE lorafa
#endif
#define LORAFA_STR_(x) #x
#define LORAFA_STR(x) LORAFA_STR_(x)
#define LORAFA_OP(name) LORAFA_STR(LORAFA_NAMESPACE) "::" name
// TORCH_LIBRARY(_IMPL) paste their arguments unexpanded: these expand the namespace (and key) first.
#define LORAFA_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define LORAFA_LIBRARY(m) LORAFA_LIBRARY_(LORAFA_NAMESPACE, m)
#define LORAFA_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define LORAFA_LIBRARY_IMPL(key, m) LORAFA_LIBRARY_IMPL_(LORAFA_NAMESPACE, key, m)

namespace lorafa {

// Argument checks, worded as the Python fakes word them (lorafa_ext/_checks.py). weight is null
// for the low-rank ops (lowrank_forward / lowrank_backward), which have no base layer.
void check_forward(const char* op, const at::Tensor& x, const at::Tensor* weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, double scaling, double dropout_p,
                   const std::optional<at::Tensor>& seed);
void check_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& z,
                    const at::Tensor* weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scaling, double dropout_p, const std::optional<at::Tensor>& seed);
void check_gram_inverse(const char* op, const at::Tensor& lora_a, double eps);
void check_correct_grad(const char* op, const at::Tensor& grad_b, const at::Tensor& gram_inv,
                        double scaling);
void check_mask(const char* op, const at::Tensor& seed, int64_t rows, int64_t cols, double p);

// Number of rows of x once its leading dims are flattened.
int64_t flat_rows(const at::Tensor& x);
// Dtype of z = drop(x) A^T: promote(x, lora_a).
at::ScalarType z_dtype(const at::Tensor& x, const at::Tensor& lora_a);
// Dtype of the Gram matrix and its inverse: promote(lora_a, float32).
at::ScalarType gram_dtype(const at::Tensor& lora_a);

// `sizes` with the last dim replaced by `last` (the shape of y or dx from that of x or grad_y).
inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

// Scope of a backend kernel: on the tensors' device, below autocast (the composite `linear` has
// already cast to the autocast dtype).
struct KernelScope {
  explicit KernelScope(const at::Tensor& t) : device(t.device()) {}
  c10::DeviceGuard device;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The `_linear` kernel of a backend: its linear_forward (the correction arguments only matter to the
// autograd formula, autograd.cpp).
template <auto LinearForward>
Tensors2 linear_kernel(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scaling, double dropout_p,
                       const std::optional<at::Tensor>& seed, bool /*correction*/, double /*eps*/,
                       const std::optional<at::Tensor>& /*gram_inv*/) {
  return LinearForward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
}

// The `_lowrank` kernel of a backend: its lowrank_forward.
template <auto LowrankForward>
Tensors2 lowrank_kernel(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
                        bool /*correction*/, double /*eps*/,
                        const std::optional<at::Tensor>& /*gram_inv*/) {
  return LowrankForward(x, lora_a, lora_b, scaling, dropout_p, seed);
}

// Inside a LORAFA_LIBRARY_IMPL block: registers the kernels of the backend namespace `ns`, which
// defines linear_forward, linear_backward, lowrank_forward, lowrank_backward, gram_inverse,
// correct_grad and dropout_mask.
#define LORAFA_REGISTER_BACKEND(m, ns)                                 \
  m.impl("_linear", &::lorafa::linear_kernel<&ns::linear_forward>);    \
  m.impl("linear_forward", &ns::linear_forward);                       \
  m.impl("linear_backward", &ns::linear_backward);                     \
  m.impl("_lowrank", &::lorafa::lowrank_kernel<&ns::lowrank_forward>); \
  m.impl("lowrank_forward", &ns::lowrank_forward);                     \
  m.impl("lowrank_backward", &ns::lowrank_backward);                   \
  m.impl("gram_inverse", &ns::gram_inverse);                           \
  m.impl("correct_grad", &ns::correct_grad);                           \
  m.impl("dropout_mask", &ns::dropout_mask)

}  // namespace lorafa
