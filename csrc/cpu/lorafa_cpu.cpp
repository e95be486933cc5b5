// CPU kernels of the lorafa ops: ATen GEMMs with the low-rank term fused into the passes that exist
// anyway (forward: written once with the bias, then x W^T accumulated onto it, as F.linear accumulates
// onto its bias; backward: accumulated onto dy W), and parallel, vectorised Philox for dropout.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <limits>

#include "../lorafa.h"
#include "../philox.h"

namespace lorafa::cpu {

namespace {

constexpr int64_t kChunk = 1024;  // grain of the parallel mask loop, in Philox counters (4 elements each)

// keep[i] = keep-bit of element 4 * c_begin + i, for 4 * count elements: one Philox call a counter.
void keep_bytes_scalar(uint64_t seed, uint32_t threshold, uint64_t c_begin, int64_t count,
                       uint8_t* keep) {
  for (int64_t i = 0; i < count; ++i) {
    const PhiloxWords r = philox4x32_10(c_begin + static_cast<uint64_t>(i), seed);
    for (int j = 0; j < 4; ++j) keep[4 * i + j] = r.w[j] >= threshold;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LORAFA_X86_PHILOX 1

// (hi, lo) 32-bit halves of the 32 x 32 -> 64-bit products m * c in 8 lanes.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i c, __m256i& hi,
                                                      __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// keep_bytes_scalar's result, 8 counters at a time in AVX2 (c_begin and count multiples of 8).
__attribute__((target("avx2"))) void keep_bytes_avx2(uint64_t seed, uint32_t threshold,
                                                     uint64_t c_begin, int64_t count,
                                                     uint8_t* keep) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // Unsigned w >= threshold as max(w, threshold) == w.
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));
  for (int64_t base = 0; base < count; base += 8) {
    const uint64_t c = c_begin + static_cast<uint64_t>(base);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    for (int round = 0; round < 10; ++round) {
      const __m256i k0 = _mm256_set1_epi32(static_cast<int>(philox_key0(seed, round)));
      const __m256i k1 = _mm256_set1_epi32(static_cast<int>(philox_key1(seed, round)));
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0, hi0, lo0);
      mulhilo8(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
      c1 = lo1;
      c3 = lo0;
    }
    const __m256i words[4] = {c0, c1, c2, c3};
    int bits[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(words[j], thr), words[j]);
      bits[j] = _mm256_movemask_ps(_mm256_castsi256_ps(ge));
    }
    uint8_t* k = keep + 4 * base;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) k[4 * i + j] = static_cast<uint8_t>((bits[j] >> i) & 1);
  }
}

// GCC 12's AVX-512 shift intrinsics start from _mm512_undefined_epi32() and warn about it when
// inlined (GCC PR 105593); the value is fully overwritten.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// (hi, lo) 32-bit halves of the 32 x 32 -> 64-bit products m * c in 16 lanes.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i m, __m512i c, __m512i& hi,
                                                         __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);                         // lanes 0, 2, ..., 14
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);  // lanes 1, 3, ..., 15
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// keep_bytes_scalar's result, 16 counters at a time in AVX-512 (c_begin and count multiples of 16).
// The 4 x 16 keep-bits of a step are interleaved into one 64-bit mask with PDEP and stored as 64
// bytes at once.
__attribute__((target("avx512f,avx512bw,bmi2"))) void keep_bytes_avx512(uint64_t seed,
                                                                        uint32_t threshold,
                                                                        uint64_t c_begin,
                                                                        int64_t count,
                                                                        uint8_t* keep) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  for (int64_t base = 0; base < count; base += 16) {
    const uint64_t c = c_begin + static_cast<uint64_t>(base);
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))), lane);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    for (int round = 0; round < 10; ++round) {
      const __m512i k0 = _mm512_set1_epi32(static_cast<int>(philox_key0(seed, round)));
      const __m512i k1 = _mm512_set1_epi32(static_cast<int>(philox_key1(seed, round)));
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(m0, c0, hi0, lo0);
      mulhilo16(m1, c2, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), k0);
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), k1);
      c1 = lo1;
      c3 = lo0;
    }
    // Bit 4 i + j of `bits` = keep-bit of word j of counter c + i.
    const uint64_t bits = _pdep_u64(_mm512_cmpge_epu32_mask(c0, thr), 0x1111111111111111ull) |
                          _pdep_u64(_mm512_cmpge_epu32_mask(c1, thr), 0x2222222222222222ull) |
                          _pdep_u64(_mm512_cmpge_epu32_mask(c2, thr), 0x4444444444444444ull) |
                          _pdep_u64(_mm512_cmpge_epu32_mask(c3, thr), 0x8888888888888888ull);
    _mm512_storeu_si512(keep + 4 * base, _mm512_maskz_set1_epi8(bits, 1));
  }
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// The widest Philox path this CPU runs: 0 scalar, 8 (AVX2) or 16 (AVX-512) counters a step.
// LORAFA_CPU_PHILOX=scalar|avx2 selects a narrower one (the tests check every path against the
// reference on one machine).
int philox_lanes() {
  static const int lanes = [] {
    int best = 0;
#ifdef LORAFA_X86_PHILOX
    if (__builtin_cpu_supports("avx2")) best = 8;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("bmi2")) {
      best = 16;
    }
#endif
    const char* want = std::getenv("LORAFA_CPU_PHILOX");
    if (want != nullptr && std::strcmp(want, "scalar") == 0) return 0;
    if (want != nullptr && std::strcmp(want, "avx2") == 0) return std::min(best, 8);
    return best;
  }();
  return lanes;
}

void keep_bytes(uint64_t seed, uint32_t threshold, uint64_t c_begin, int64_t count, uint8_t* keep) {
#ifdef LORAFA_X86_PHILOX
  if (const int64_t lanes = philox_lanes(); lanes > 0) {
    // Scalar up to a multiple of `lanes` counters (so the low counter word cannot carry inside a
    // vector), vectors for whole groups, scalar for the tail.
    const int64_t head = std::min<int64_t>(count, (lanes - static_cast<int64_t>(c_begin % lanes)) % lanes);
    const int64_t vec = (count - head) / lanes * lanes;
    keep_bytes_scalar(seed, threshold, c_begin, head, keep);
    if (lanes == 16) {
      keep_bytes_avx512(seed, threshold, c_begin + head, vec, keep + 4 * head);
    } else {
      keep_bytes_avx2(seed, threshold, c_begin + head, vec, keep + 4 * head);
    }
    keep_bytes_scalar(seed, threshold, c_begin + head + vec, count - head - vec,
                      keep + 4 * (head + vec));
    return;
  }
#endif
  keep_bytes_scalar(seed, threshold, c_begin, count, keep);
}

// Keep-bits of elements [e0, e1) of the flattened input: returns keep with keep[i] for element e0 + i.
const uint8_t* keep_range(uint64_t seed, uint32_t threshold, int64_t e0, int64_t e1,
                          std::vector<uint8_t>& buffer) {
  const int64_t c0 = e0 >> 2, c1 = (e1 + 3) >> 2;
  buffer.resize(static_cast<size_t>(4 * (c1 - c0)));
  keep_bytes(seed, threshold, static_cast<uint64_t>(c0), c1 - c0, buffer.data());
  return buffer.data() + (e0 & 3);
}

uint64_t seed_value(const std::optional<at::Tensor>& seed) {
  return static_cast<uint64_t>(seed->item<int64_t>());
}

constexpr int64_t kRowBlock = 64;  // rows of x (or dx) a block: the block's temporaries stay in cache

// Calls f(b, e) for blocks [b, e) of at most kRowBlock rows, in parallel.
template <typename F>
void parallel_row_blocks(int64_t rows, const F& f) {
  at::parallel_for(0, (rows + kRowBlock - 1) / kRowBlock, 1, [&](int64_t blk_b, int64_t blk_e) {
    for (int64_t blk = blk_b; blk < blk_e; ++blk) {
      f(blk * kRowBlock, std::min(rows, (blk + 1) * kRowBlock));
    }
  });
}

// z = drop(x2) @ a_t with z (rows, r) contiguous in z's dtype, a_t (in, r). Row block by row block:
// the dropped (and dtype-converted) block of x lives only in a cache-sized temporary.
void project_dropped(const at::Tensor& x2, const at::Tensor& a_t, at::Tensor& z, uint64_t seed,
                     double p) {
  const int64_t rows = x2.size(0), in = x2.size(1);
  const uint32_t threshold = dropout_threshold(p);
  parallel_row_blocks(rows, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buffer;
    const uint8_t* keep = p > 0.0 ? keep_range(seed, threshold, b * in, e * in, buffer) : nullptr;
    const at::Tensor src = x2.slice(0, b, e).contiguous();
    at::Tensor dst = at::empty({e - b, in}, z.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "lorafa_drop", [&] {
      using src_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lorafa_drop_z", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
        const src_t* in_p = src.const_data_ptr<src_t>();
        scalar_t* out_p = dst.mutable_data_ptr<scalar_t>();
        const int64_t n = (e - b) * in;
        // Branch-free loops (keep-bytes are 0 or 1), so that each vectorises.
        if (keep == nullptr) {
          for (int64_t i = 0; i < n; ++i) out_p[i] = static_cast<scalar_t>(static_cast<acc_t>(in_p[i]));
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const acc_t m = scale * static_cast<acc_t>(keep[i]);
            out_p[i] = static_cast<scalar_t>(static_cast<acc_t>(in_p[i]) * m);
          }
        }
      });
    });
    at::Tensor z_blk = z.slice(0, b, e);
    at::mm_out(z_blk, dst, a_t);
  });
}

// The low-rank term of an output, row block by row block (each block's product lives in a
// cache-sized temporary): with `accumulate`, dst2 += alpha * keep * (left @ right); without,
// dst2 = bias + alpha * (left @ right), written once and never read, for a GEMM to accumulate onto
// (beta = 1) as F.linear accumulates onto its bias. dst2 (rows, C) contiguous, left (rows, r),
// right (r, C), bias (C) or undefined; the product may have a higher precision than dst2; p = 0 keeps
// every element (dropout only with `accumulate`).
void lowrank_into(at::Tensor& dst2, const at::Tensor& left, const at::Tensor& right,
                  const at::Tensor& bias, double alpha, uint64_t seed, double p, bool accumulate) {
  TORCH_INTERNAL_ASSERT(accumulate ? !bias.defined() : p == 0.0);
  const int64_t rows = dst2.size(0), cols = dst2.size(1);
  const uint32_t threshold = dropout_threshold(p);
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  parallel_row_blocks(rows, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buffer;
    const uint8_t* keep = p > 0.0 ? keep_range(seed, threshold, b * cols, e * cols, buffer) : nullptr;
    const at::Tensor u = at::mm(left.slice(0, b, e), right);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst2.scalar_type(), "lorafa_lowrank", [&] {
      using dst_t = scalar_t;
      const dst_t* bias_p = bias_c.defined() ? bias_c.const_data_ptr<dst_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lorafa_lowrank_u", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t a = static_cast<acc_t>(alpha);
        // One branch-free loop per case (keep-bytes are 0 or 1), so that each vectorises.
        for (int64_t n = b; n < e; ++n) {
          const scalar_t* __restrict__ u_p = u.const_data_ptr<scalar_t>() + (n - b) * cols;
          dst_t* __restrict__ out_p = dst2.mutable_data_ptr<dst_t>() + n * cols;
          if (accumulate && keep != nullptr) {
            const uint8_t* __restrict__ k_p = keep + (n - b) * cols;
            for (int64_t c = 0; c < cols; ++c) {
              out_p[c] = static_cast<dst_t>(static_cast<acc_t>(out_p[c]) +
                                            a * static_cast<acc_t>(k_p[c]) * static_cast<acc_t>(u_p[c]));
            }
          } else if (accumulate) {
            for (int64_t c = 0; c < cols; ++c) {
              out_p[c] = static_cast<dst_t>(static_cast<acc_t>(out_p[c]) + a * static_cast<acc_t>(u_p[c]));
            }
          } else if (bias_p != nullptr) {
            for (int64_t c = 0; c < cols; ++c) {
              out_p[c] = static_cast<dst_t>(static_cast<acc_t>(bias_p[c]) + a * static_cast<acc_t>(u_p[c]));
            }
          } else {
            for (int64_t c = 0; c < cols; ++c) out_p[c] = static_cast<dst_t>(a * static_cast<acc_t>(u_p[c]));
          }
        }
      });
    });
  });
}

// z = drop(x2) A^T (rows, r) in a's dtype, z's (a: the adapter A in z's dtype).
at::Tensor project(const at::Tensor& x2, const at::Tensor& a, double dropout_p,
                   const std::optional<at::Tensor>& seed) {
  at::Tensor z = at::empty({x2.size(0), a.size(0)}, x2.options().dtype(a.scalar_type()));
  if (dropout_p == 0.0 && a.scalar_type() == x2.scalar_type()) {
    at::mm_out(z, x2, a.t());
  } else {
    const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
    project_dropped(x2, a.t(), z, s, dropout_p);
  }
  return z;
}

// dx2 (+)= s drop'(t A) with t = dy B: accumulated onto dx2 with `accumulate`, else written. dyz is
// dy in z's dtype, a and b the adapters in it.
void expand_dx(at::Tensor& dx2, const at::Tensor& dyz, const at::Tensor& a, const at::Tensor& b,
               double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
               bool accumulate) {
  const at::Tensor t = at::mm(dyz, b);
  if (dropout_p == 0.0 && dyz.scalar_type() == dx2.scalar_type()) {
    at::addmm_out(dx2, dx2, t, a, /*beta=*/accumulate ? 1.0 : 0.0, /*alpha=*/scaling);
  } else {
    if (!accumulate) dx2.zero_();
    const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
    lowrank_into(dx2, t, a, at::Tensor(), scaling / (1.0 - dropout_p), s, dropout_p,
                 /*accumulate=*/true);
  }
}

}  // namespace

Tensors2 linear_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scaling, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.linear_forward", x, &weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
  KernelScope scope(x);
  const int64_t out = weight.size(0), in = weight.size(1), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor x2 = x.reshape({rows, in});
  // The adapters in z's dtype (no copy when they have it already: fp32 adapters with fp64 x do not).
  const at::Tensor a = lora_a.to(zdt), b = lora_b.to(zdt);
  // y is allocated in its final shape and filled through a 2-D view, so the op returns no view.
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = y.view({rows, out});
  const at::Tensor z = project(x2, a, dropout_p, seed);
  // y = bias + s z B^T, written once; then y += x W^T inside the GEMM (beta = 1).
  lowrank_into(y2, z, b.t(), bias.has_value() ? *bias : at::Tensor(), scaling, 0, 0.0,
               /*accumulate=*/false);
  y2.addmm_(x2, weight.t());
  return {y, z};
}

Tensors3 linear_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                         double dropout_p, const std::optional<at::Tensor>& seed,
                         std::array<bool, 3> output_mask) {
  check_backward("lorafa.linear_backward", grad_y, z, &weight, lora_a, lora_b, scaling, dropout_p,
                 seed);
  KernelScope scope(grad_y);
  const int64_t out = weight.size(0), in = weight.size(1), rows = flat_rows(grad_y);
  const auto zdt = z.scalar_type();
  const at::Tensor dy = grad_y.reshape({rows, out});
  const at::Tensor dyz = dy.to(zdt);
  const at::Tensor a = lora_a.to(zdt), b = lora_b.to(zdt);  // as in the forward
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0}), d_bias = grad_y.new_empty({0});
  if (output_mask[0]) {
    dx = at::empty(with_last(grad_y.sizes(), in), grad_y.options());
    at::Tensor dx2 = dx.view({rows, in});
    // dx = dy W, then += s drop'(t A) with t = dy B. (Writing the low-rank term first and letting the
    // GEMM accumulate onto it moves as many bytes here: the GEMM would read dx back.)
    at::mm_out(dx2, dy, weight);
    expand_dx(dx2, dyz, a, b, scaling, dropout_p, seed, /*accumulate=*/true);
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

Tensors2 lowrank_forward(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_forward("lorafa.lowrank_forward", x, nullptr, std::nullopt, lora_a, lora_b, scaling,
                dropout_p, seed);
  KernelScope scope(x);
  const int64_t out = lora_b.size(0), in = lora_a.size(1), rows = flat_rows(x);
  const auto zdt = z_dtype(x, lora_a);
  const at::Tensor a = lora_a.to(zdt), b = lora_b.to(zdt);  // as in linear_forward
  const at::Tensor z = project(x.reshape({rows, in}), a, dropout_p, seed);
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = y.view({rows, out});
  lowrank_into(y2, z, b.t(), at::Tensor(), scaling, 0, 0.0, /*accumulate=*/false);
  return {y, z};
}

Tensors2 lowrank_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scaling, double dropout_p,
                          const std::optional<at::Tensor>& seed, std::array<bool, 2> output_mask) {
  check_backward("lorafa.lowrank_backward", grad_y, z, nullptr, lora_a, lora_b, scaling, dropout_p,
                 seed);
  KernelScope scope(grad_y);
  const int64_t out = lora_b.size(0), in = lora_a.size(1), rows = flat_rows(grad_y);
  const auto zdt = z.scalar_type();
  const at::Tensor dyz = grad_y.reshape({rows, out}).to(zdt);
  const at::Tensor a = lora_a.to(zdt), b = lora_b.to(zdt);
  at::Tensor dx = grad_y.new_empty({0}), d_b = lora_b.new_empty({0});
  if (output_mask[0]) {
    dx = at::empty(with_last(grad_y.sizes(), in), grad_y.options());
    at::Tensor dx2 = dx.view({rows, in});
    expand_dx(dx2, dyz, a, b, scaling, dropout_p, seed, /*accumulate=*/false);
  }
  if (output_mask[1]) d_b = at::mm(dyz.t(), z).mul_(scaling).to(lora_b.scalar_type());
  return {dx, d_b};
}

at::Tensor gram_inverse(const at::Tensor& lora_a, double eps) {
  check_gram_inverse("lorafa.gram_inverse", lora_a, eps);
  KernelScope scope(lora_a);
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
  KernelScope scope(grad_b);
  return at::mm(grad_b.to(gram_inv.scalar_type()), gram_inv)
      .mul_(1.0 / (scaling * scaling))
      .to(grad_b.scalar_type());
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_mask("lorafa.dropout_mask", seed, rows, cols, p);
  at::Tensor mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  // keep_bytes writes 0/1 bytes, a valid bool each: whole counters straight into the mask, in
  // parallel, and the last numel % 4 elements through a 4-byte temporary.
  auto* out = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
  const auto key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t numel = rows * cols, full = numel / 4;
  at::parallel_for(0, full, kChunk, [&](int64_t c0, int64_t c1) {
    keep_bytes(key, threshold, static_cast<uint64_t>(c0), c1 - c0, out + 4 * c0);
  });
  if (numel % 4 != 0) {
    uint8_t tail[4];
    keep_bytes(key, threshold, static_cast<uint64_t>(full), 1, tail);
    std::copy(tail, tail + numel % 4, out + 4 * full);
  }
  return mask;
}

}  // namespace lorafa::cpu

LORAFA_LIBRARY_IMPL(CPU, m) { LORAFA_REGISTER_BACKEND(m, lorafa::cpu); }
