// The one way the host code starts a kernel: launch(config, kernel, args...). With nvcc it is
// kernel<<<grid, block, smem, stream>>>(args...) followed by C10_CUDA_KERNEL_LAUNCH_CHECK(); the
// emulated device (tests/emulator/simt.h) supplies its own launch with the same signature, which
// validates the configuration as the CUDA runtime does and runs the kernel on the CPU.
#pragma once

#include <cstddef>

#include "device.h"

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#endif

namespace lorafa::cuda {

// Static plus dynamic shared memory a block may use without opting in (cudaFuncSetAttribute).
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;          // dynamic shared memory, bytes
  cudaStream_t stream;  // always the current stream (current_stream())
  int max_threads;      // the kernel's __launch_bounds__ (1024 for a kernel without)
};

#if defined(__CUDACC__)
template <typename... Params, typename... Args>
void launch(const LaunchConfig& config, void (*kernel)(Params...), Args... args) {
  kernel<<<config.grid, config.block, config.smem, config.stream>>>(static_cast<Params>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace lorafa::cuda
