// csrc/cuda/runtime.h on the emulated device: CPU tensors stand for device memory (poisoned when
// allocated), a CPU GEMM with cuBLAS's argument checks stands for cublasGemmEx, and the device
// reports kSmCount SMs. Also the control ops of the emulator, torch.ops.lorafa_emulator.*.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda/runtime.h"
#include "emulator.h"

namespace lorafa::cuda {

cudaStream_t current_stream() { return emu::emulated_stream(); }

int64_t sm_count() { return emu::kSmCount; }

// Poisoned so that an element no kernel writes shows: NaN for floats, true for bools.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.is_floating_point()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() == at::kBool) {
    t.fill_(true);
  } else {
    t.fill_(-1);
  }
  return t;
}

namespace {

std::string call_text(const CublasGemm& g) {
  return c10::str("cublasGemmEx(handle, ", g.trans_a ? "CUBLAS_OP_T" : "CUBLAS_OP_N", ", ",
                  g.trans_b ? "CUBLAS_OP_T" : "CUBLAS_OP_N", ", m=", g.m, ", n=", g.n, ", k=", g.k,
                  ", lda=", g.lda, ", ldb=", g.ldb, ", ldc=", g.ldc, ")");
}

// A column-major (rows, cols) matrix with leading dimension ld at p, as a strided CPU tensor.
at::Tensor column_major(const void* p, int64_t rows, int64_t cols, int64_t ld, at::ScalarType t) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {1, ld}, at::TensorOptions().dtype(t));
}

}  // namespace

// cuBLAS's checks (CUBLAS_STATUS_INVALID_VALUE): m, n, k >= 0, lda >= max(1, rows of A as stored),
// ldb likewise, ldc >= max(1, m). Then C = alpha op(A) op(B) + beta C accumulated in fp32 (fp64 for
// fp64), reading C only when beta != 0.
void cublas_gemm(const CublasGemm& g) {
  const int a_rows = g.trans_a ? g.k : g.m, b_rows = g.trans_b ? g.n : g.k;
  const bool valid = g.m >= 0 && g.n >= 0 && g.k >= 0 && g.lda >= std::max(1, a_rows) &&
                     g.ldb >= std::max(1, b_rows) && g.ldc >= std::max(1, g.m);
  TORCH_CHECK(valid, "CUDA error: CUBLAS_STATUS_INVALID_VALUE when calling `", call_text(g), "`");
  TORCH_CHECK(g.dtype == at::kFloat || g.dtype == at::kHalf || g.dtype == at::kBFloat16 ||
                  g.dtype == at::kDouble,
              "lorafa: unsupported GEMM dtype ", g.dtype);
  if (emu::dry_run_enabled() || g.m == 0 || g.n == 0) return;
  const at::ScalarType acc = g.dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a = column_major(g.a, a_rows, g.trans_a ? g.m : g.k, g.lda, g.dtype);
  at::Tensor b = column_major(g.b, b_rows, g.trans_b ? g.k : g.n, g.ldb, g.dtype);
  at::Tensor c = column_major(g.c, g.m, g.n, g.ldc, g.dtype);
  if (g.trans_a) a = a.t();
  if (g.trans_b) b = b.t();
  at::Tensor result = at::mm(a.to(acc), b.to(acc)).mul_(g.alpha);
  if (g.beta != 0.0) result.add_(c.to(acc), g.beta);
  c.copy_(result);
}

}  // namespace lorafa::cuda

namespace {

void set_schedule_seed(int64_t seed) { lorafa::emu::set_schedule_seed(static_cast<uint64_t>(seed)); }
void set_dry_run(bool on) { lorafa::emu::set_dry_run(on); }
int64_t launches() { return static_cast<int64_t>(lorafa::emu::launches()); }

}  // namespace

TORCH_LIBRARY(lorafa_emulator, m) {
  m.def("set_schedule_seed(int seed) -> ()", &set_schedule_seed);
  m.def("set_dry_run(bool on) -> ()", &set_dry_run);
  m.def("launches() -> int", &launches);
}
