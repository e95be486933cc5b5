// Host test of csrc/philox.h, which the CUDA kernels compile for the device: dropout_keep4 (one or
// two Philox calls for four elements) agrees with dropout_keep element by element, at every
// alignment of the first element, across counter and seed words, and at the threshold's extremes.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../philox.h"

int main() {
  using namespace lorafa;
  int failures = 0;
  const uint64_t seeds[] = {0, 1234, 0x9E3779B97F4A7C15ull, ~0ull};
  const uint64_t starts[] = {0, 1, 2, 3, 4097, (1ull << 32) - 2, (1ull << 34) + 3, (1ull << 40) + 5};
  const uint32_t thresholds[] = {0u, 1u, dropout_threshold(0.1), dropout_threshold(0.5),
                                 dropout_threshold(0.999), 0xFFFFFFFFu};
  long checked = 0;
  for (uint64_t seed : seeds) {
    for (uint64_t start : starts) {
      for (uint32_t threshold : thresholds) {
        for (uint64_t first = start; first < start + 8; ++first) {
          const uint32_t bits = dropout_keep4(seed, first, threshold);
          for (uint32_t q = 0; q < 4; ++q) {
            const bool want = dropout_keep(seed, first + q, threshold);
            if (((bits >> q) & 1u) != static_cast<uint32_t>(want)) {
              if (++failures <= 10)
                std::printf("dropout_keep4 mismatch: seed %llu first %llu q %u threshold %u\n",
                            static_cast<unsigned long long>(seed),
                            static_cast<unsigned long long>(first), q, threshold);
            }
            ++checked;
          }
        }
      }
    }
  }
  // Random123's known-answer vector for Philox4x32-10: counter 0, key 0.
  const PhiloxWords kat = philox4x32_10(0, 0);
  const uint32_t want_kat[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  for (int i = 0; i < 4; ++i) failures += kat.w[i] != want_kat[i];
  std::printf("philox: %ld keep-bits compared, %s\n", checked, failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
