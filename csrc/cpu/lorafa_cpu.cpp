// CPU kernels of the lorafa ops: ATen GEMMs (in-place accumulation, no separate scale/add passes)
// plus a parallel Philox loop for dropout.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
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
#define LORAFA_AVX2_PHILOX 1

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
#endif

void keep_bytes(uint64_t seed, uint32_t threshold, uint64_t c_begin, int64_t count, uint8_t* keep) {
#ifdef LORAFA_AVX2_PHILOX
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) {
    // Scalar up to a multiple of 8 counters, AVX2 for whole groups of 8, scalar for the tail.
    const int64_t head = std::min<int64_t>(count, (8 - static_cast<int64_t>(c_begin % 8)) % 8);
    const int64_t vec = (count - head) / 8 * 8;
    keep_bytes_scalar(seed, threshold, c_begin, head, keep);
    keep_bytes_avx2(seed, threshold, c_begin + head, vec, keep + 4 * head);
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
        for (int64_t i = 0; i < n; ++i) {
          const acc_t m = keep == nullptr ? acc_t(1) : keep[i] ? scale : acc_t(0);
          out_p[i] = static_cast<scalar_t>(static_cast<acc_t>(in_p[i]) * m);
        }
      });
    });
    at::Tensor z_blk = z.slice(0, b, e);
    at::mm_out(z_blk, dst, a_t);
  });
}

// dst2 (rows, C) contiguous += alpha * keep * (left @ right) with left (rows, r), right (r, C), where
// the product may have a higher precision than dst2; p = 0 keeps every element. Row block by row
// block, so the N x C product never exists in full.
void add_lowrank(at::Tensor& dst2, const at::Tensor& left, const at::Tensor& right, double alpha,
                 uint64_t seed, double p) {
  const int64_t rows = dst2.size(0), cols = dst2.size(1);
  const uint32_t threshold = dropout_threshold(p);
  parallel_row_blocks(rows, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buffer;
    const uint8_t* keep = p > 0.0 ? keep_range(seed, threshold, b * cols, e * cols, buffer) : nullptr;
    const at::Tensor u = at::mm(left.slice(0, b, e), right);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst2.scalar_type(), "lorafa_add", [&] {
      using dst_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lorafa_add_u", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t a = static_cast<acc_t>(alpha);
        const scalar_t* u_p = u.const_data_ptr<scalar_t>();
        dst_t* out_p = dst2.mutable_data_ptr<dst_t>() + b * cols;
        const int64_t n = (e - b) * cols;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t m = keep == nullptr ? a : keep[i] ? a : acc_t(0);
          out_p[i] = static_cast<dst_t>(static_cast<acc_t>(out_p[i]) + m * static_cast<acc_t>(u_p[i]));
        }
      });
    });
  });
}

// x's shape with the last dim replaced.
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
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
  // y is allocated in its final shape and filled through a 2-D view, so the op returns no view.
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  at::Tensor y2 = y.view({rows, out});
  if (bias.has_value()) {
    at::addmm_out(y2, *bias, x2, weight.t());
  } else {
    at::mm_out(y2, x2, weight.t());
  }
  at::Tensor z = at::empty({rows, lora_a.size(0)}, x.options().dtype(zdt));
  if (dropout_p == 0.0 && zdt == x.scalar_type()) {
    at::mm_out(z, x2, lora_a.t());
  } else {
    const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
    project_dropped(x2, lora_a.to(zdt).t(), z, s, dropout_p);
  }
  if (zdt == x.scalar_type()) {
    y2.addmm_(z, lora_b.t(), /*beta=*/1.0, /*alpha=*/scaling);
  } else {
    add_lowrank(y2, z, lora_b.to(zdt).t(), scaling, 0, 0.0);
  }
  return {y, z};
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
    dx = at::empty(out_shape(grad_y, in), grad_y.options());
    at::Tensor dx2 = dx.view({rows, in});
    at::mm_out(dx2, dy, weight);
    const at::Tensor t = at::mm(dyz, lora_b.to(zdt));
    if (dropout_p == 0.0 && zdt == dx.scalar_type()) {
      dx2.addmm_(t, lora_a, /*beta=*/1.0, /*alpha=*/scaling);
    } else {
      const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
      add_lowrank(dx2, t, lora_a.to(zdt), scaling / (1.0 - dropout_p), s, dropout_p);
    }
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
