// Declarations shared by the lorafa op registrations (ops.cpp) and the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lorafa {

// Argument checks, worded as the Python fakes word them (lorafa_ext/_checks.py).
void check_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, double scaling, double dropout_p,
                   const std::optional<at::Tensor>& seed);
void check_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& z,
                    const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
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

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

namespace cpu {
Tensors2 linear_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scaling, double dropout_p,
                        const std::optional<at::Tensor>& seed);
Tensors3 linear_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                         double dropout_p, const std::optional<at::Tensor>& seed,
                         std::array<bool, 3> output_mask);
at::Tensor gram_inverse(const at::Tensor& lora_a, double eps);
at::Tensor correct_grad(const at::Tensor& grad_b, const at::Tensor& gram_inv, double scaling);
at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p);
}  // namespace cpu

}  // namespace lorafa
