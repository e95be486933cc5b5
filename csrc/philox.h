// Philox4x32-10 counter-based RNG and the LoRA-FA dropout mask, shared by the CPU and CUDA kernels.
//
// The keep-mask of element e of the flattened (N, in) input is word (e & 3) of
// Philox(counter = (e >> 2, (e >> 2) >> 32, 0, 0), key = (seed, seed >> 32)); the element is dropped iff
// that word < floor(p * 2^32). The Python fallback and lorafa_ext/reference.py implement the same
// definition, so every backend draws the same mask for a seed.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORAFA_HD __host__ __device__ __forceinline__
#else
#define LORAFA_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define LORAFA_UNROLL _Pragma("unroll")
#else
#define LORAFA_UNROLL
#endif

namespace lorafa {

struct PhiloxWords {
  uint32_t w[4];
};

// One Philox4x32 round on the counter (c0, c1, c2, c3) with key (k0, k1).
LORAFA_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                            uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
  const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Key of round `round` (0-based): the seed's words plus `round` Weyl increments.
LORAFA_HD uint32_t philox_key0(uint64_t seed, int round) {
  return static_cast<uint32_t>(seed) + 0x9E3779B9u * static_cast<uint32_t>(round);
}
LORAFA_HD uint32_t philox_key1(uint64_t seed, int round) {
  return static_cast<uint32_t>(seed >> 32) + 0xBB67AE85u * static_cast<uint32_t>(round);
}

LORAFA_HD PhiloxWords philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  LORAFA_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, philox_key0(seed, round), philox_key1(seed, round));
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// floor(p * 2^32) for p in [0, 1): words below it are dropped.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

// r.w[i] for i in [0, 4), by selects (a register array indexed at run time would go to local memory).
LORAFA_HD uint32_t philox_word(const PhiloxWords& r, uint32_t i) {
  return i == 0 ? r.w[0] : i == 1 ? r.w[1] : i == 2 ? r.w[2] : r.w[3];
}

// Whether element `index` of the flattened input is kept.
LORAFA_HD bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  const PhiloxWords r = philox4x32_10(index >> 2, seed);
  return philox_word(r, static_cast<uint32_t>(index & 3)) >= threshold;
}

// Keep-bits of the four elements first, ..., first + 3 (bit q: element first + q): one Philox call
// when first is a multiple of 4, two otherwise, instead of one per element.
LORAFA_HD uint32_t dropout_keep4(uint64_t seed, uint64_t first, uint32_t threshold) {
  const uint32_t off = static_cast<uint32_t>(first & 3);
  const PhiloxWords lo = philox4x32_10(first >> 2, seed);
  const PhiloxWords hi = off != 0 ? philox4x32_10((first >> 2) + 1, seed) : lo;
  uint32_t bits = 0;
  LORAFA_UNROLL
  for (uint32_t q = 0; q < 4; ++q) {
    const uint32_t i = off + q;
    const uint32_t word = i < 4 ? philox_word(lo, i) : philox_word(hi, i - 4);
    bits |= static_cast<uint32_t>(word >= threshold) << q;
  }
  return bits;
}

}  // namespace lorafa
