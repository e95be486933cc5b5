// The emulated CUDA device's own interface, shared by simt.cpp and runtime.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "simt.h"

namespace lorafa::emu {

constexpr size_t kMaxSharedBytesPerBlock = 48 * 1024;  // static + dynamic, without opting in
constexpr int64_t kSmCount = 132;                       // as an H100 SXM or H200

// The one stream of the device: the current stream (a launch on any other is an error).
inline cudaStream_t emulated_stream() {
  static char token;
  return reinterpret_cast<cudaStream_t>(&token);
}

// The seed of the block and thread orders of the launches that follow.
void set_schedule_seed(uint64_t seed);
// On: launches and GEMMs are checked but not run (for configurations too large to emulate).
void set_dry_run(bool on);
bool dry_run_enabled();
// Kernel launches so far.
uint64_t launches();

}  // namespace lorafa::emu
