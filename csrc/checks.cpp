// Argument checks of the lorafa ops. lorafa_ext/_checks.py performs the same checks with the same
// messages for the fakes and the Python backend (tests/test_check_messages.py compares them).
#include <cctype>
#include <cmath>
#include <sstream>
#include <string>

#include "lorafa.h"

namespace lorafa {

namespace {

// A dtype as Python names it (torch.float32), as the messages of lorafa_ext/_checks.py do.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // the others are their c10 name in lower case: torch.bool, torch.bfloat16, ...
      std::string name = c10::toString(t);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

// A shape as a Python tuple prints it: (), (5,), (4, 9).
std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_scalars(const char* op, double scaling, double dropout_p) {
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

void check_seed(const char* op, const std::optional<at::Tensor>& seed, double dropout_p,
                const at::Device& device) {
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value(), op, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
              ": seed must be a one-element int64 tensor, got ", dtype_name(seed->scalar_type()),
              " of shape ", shape_str(seed->sizes()));
  TORCH_CHECK(seed->device() == device, op, ": seed must be on the inputs' device ", device,
              ", got ", seed->device());
}

// x-like tensor (x, last dim `in`, or grad_y, last dim `out`) against the parameters. weight is
// null for the low-rank ops, whose only parameters are the adapters: then out and in are lora_b's
// rows and lora_a's columns, and only r is matched between them.
void check_params(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor* weight,
                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(is_float(x.scalar_type()), op, ": ", x_name, " must be a floating-point tensor, got ",
              dtype_name(x.scalar_type()));
  if (weight != nullptr) {
    TORCH_CHECK(weight->dim() == 2, op, ": weight must be 2-D (out, in), got shape ",
                shape_str(weight->sizes()));
  }
  TORCH_CHECK(lora_a.dim() == 2, op, ": lora_a must be 2-D (r, in), got shape ",
              shape_str(lora_a.sizes()));
  TORCH_CHECK(lora_b.dim() == 2, op, ": lora_b must be 2-D (out, r), got shape ",
              shape_str(lora_b.sizes()));
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r >= 1, op, ": lora_a must have at least one row (rank r >= 1), got r = ", r);
  const int64_t out = weight != nullptr ? weight->size(0) : lora_b.size(0);
  if (weight != nullptr) {
    const int64_t in = weight->size(1);
    TORCH_CHECK(lora_a.size(1) == in, op, ": lora_a must have shape (r, in) with in = ", in,
                ", got ", shape_str(lora_a.sizes()));
    TORCH_CHECK(lora_b.size(0) == out && lora_b.size(1) == r, op,
                ": lora_b must have shape (out, r) = (", out, ", ", r, "), got ",
                shape_str(lora_b.sizes()));
    TORCH_CHECK(weight->scalar_type() == x.scalar_type(), op, ": weight must have ", x_name,
                "'s dtype ", dtype_name(x.scalar_type()), ", got ",
                dtype_name(weight->scalar_type()));
  } else {
    TORCH_CHECK(lora_b.size(1) == r, op, ": lora_b must have shape (out, r) with r = ", r,
                ", got ", shape_str(lora_b.sizes()));
  }
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type(), op,
              ": lora_a and lora_b must share a dtype, got ", dtype_name(lora_a.scalar_type()),
              " and ", dtype_name(lora_b.scalar_type()));
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type() || lora_a.scalar_type() == at::kFloat, op,
              ": lora_a/lora_b must have ", x_name, "'s dtype ", dtype_name(x.scalar_type()),
              " or float32, got ", dtype_name(lora_a.scalar_type()));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape (out,) = (",
                out, ",), got ", shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have ", x_name,
                "'s dtype ", dtype_name(x.scalar_type()), ", got ",
                dtype_name(bias->scalar_type()));
  }
  const std::pair<const char*, const at::Tensor*> params[] = {
      {"weight", weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
      {"bias", bias.has_value() ? &*bias : nullptr}};
  for (const auto& [name, t] : params) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x_name, "'s device ",
                x.device(), ", got ", t->device());
  }
}

// z against grad_y and the adapters (the backward ops).
void check_z(const char* op, const at::Tensor& grad_y, const at::Tensor& z,
             const at::Tensor& lora_a) {
  const int64_t r = lora_a.size(0), rows = flat_rows(grad_y);
  TORCH_CHECK(z.dim() == 2 && z.size(0) == rows && z.size(1) == r, op,
              ": z must have shape (N, r) = (", rows, ", ", r, "), got ", shape_str(z.sizes()));
  TORCH_CHECK(z.scalar_type() == z_dtype(grad_y, lora_a), op, ": z must have dtype ",
              dtype_name(z_dtype(grad_y, lora_a)), ", got ", dtype_name(z.scalar_type()));
  TORCH_CHECK(z.device() == grad_y.device(), op, ": z must be on grad_y's device ",
              grad_y.device(), ", got ", z.device());
}

}  // namespace

int64_t flat_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

at::ScalarType z_dtype(const at::Tensor& x, const at::Tensor& lora_a) {
  return at::promote_types(x.scalar_type(), lora_a.scalar_type());
}

at::ScalarType gram_dtype(const at::Tensor& lora_a) {
  return at::promote_types(lora_a.scalar_type(), at::kFloat);
}

void check_forward(const char* op, const at::Tensor& x, const at::Tensor* weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, double scaling, double dropout_p,
                   const std::optional<at::Tensor>& seed) {
  check_params(op, "x", x, weight, lora_a, lora_b, bias);
  const int64_t in = weight != nullptr ? weight->size(1) : lora_a.size(1);
  TORCH_CHECK(x.size(-1) == in, op, ": x must have shape (*, in) with in = ",
              weight != nullptr ? "weight.shape[1]" : "lora_a.shape[1]", " = ", in, ", got ",
              shape_str(x.sizes()));
  check_scalars(op, scaling, dropout_p);
  check_seed(op, seed, dropout_p, x.device());
}

void check_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& z,
                    const at::Tensor* weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_params(op, "grad_y", grad_y, weight, lora_a, lora_b, std::nullopt);
  const int64_t out = weight != nullptr ? weight->size(0) : lora_b.size(0);
  TORCH_CHECK(grad_y.size(-1) == out, op, ": grad_y must have shape (*, out) with out = ",
              weight != nullptr ? "weight.shape[0]" : "lora_b.shape[0]", " = ", out, ", got ",
              shape_str(grad_y.sizes()));
  check_z(op, grad_y, z, lora_a);
  check_scalars(op, scaling, dropout_p);
  check_seed(op, seed, dropout_p, grad_y.device());
}

void check_gram_inverse(const char* op, const at::Tensor& lora_a, double eps) {
  TORCH_CHECK(lora_a.dim() == 2, op, ": lora_a must be 2-D (r, in), got shape ",
              shape_str(lora_a.sizes()));
  TORCH_CHECK(lora_a.size(0) >= 1, op,
              ": lora_a must have at least one row (rank r >= 1), got r = 0");
  TORCH_CHECK(is_float(lora_a.scalar_type()), op, ": lora_a must be floating-point, got ",
              dtype_name(lora_a.scalar_type()));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
}

void check_correct_grad(const char* op, const at::Tensor& grad_b, const at::Tensor& gram_inv,
                        double scaling) {
  TORCH_CHECK(grad_b.dim() == 2, op, ": grad_b must be 2-D (out, r), got shape ",
              shape_str(grad_b.sizes()));
  TORCH_CHECK(is_float(grad_b.scalar_type()), op, ": grad_b must be floating-point, got ",
              dtype_name(grad_b.scalar_type()));
  const int64_t r = grad_b.size(1);
  TORCH_CHECK(gram_inv.dim() == 2 && gram_inv.size(0) == r && gram_inv.size(1) == r, op,
              ": gram_inv must have shape (r, r) = (", r, ", ", r, "), got ",
              shape_str(gram_inv.sizes()));
  TORCH_CHECK(gram_inv.scalar_type() == at::kFloat || gram_inv.scalar_type() == at::kDouble, op,
              ": gram_inv must be float32 or float64, got ", dtype_name(gram_inv.scalar_type()));
  TORCH_CHECK(gram_inv.device() == grad_b.device(), op, ": gram_inv must be on grad_b's device ",
              grad_b.device(), ", got ", gram_inv.device());
  TORCH_CHECK(std::isfinite(scaling) && scaling != 0.0, op,
              ": scaling must be finite and nonzero, got ", scaling);
}

void check_mask(const char* op, const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got (", rows, ", ", cols,
              ")");
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be a one-element int64 tensor, got ", dtype_name(seed.scalar_type()),
              " of shape ", shape_str(seed.sizes()));
}

}  // namespace lorafa
