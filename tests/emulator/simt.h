// The emulated CUDA device's vocabulary for kernels compiled by the host compiler (included by
// csrc/cuda/device.h under LORAFA_EMULATED). A CUDA thread is a fiber; the threads of a block run one
// at a time on one OS thread until each reaches __syncthreads() or returns, in a shuffled order, and
// the blocks of a grid run one after another in a shuffled order (simt.cpp). So:
//   __global__, __device__, __host__, __launch_bounds__  plain C++ functions
//   __shared__        a function-local static: one copy, shared by the block's fibers; poisoned
//                     (all bytes 0xFF: NaN for every float type) at the start of every block
//   threadIdx, blockIdx, blockDim, gridDim   the running fiber's values
//   __syncthreads()   a barrier: the fiber yields until every thread of its block has reached it
//   dynamic_smem<T>() the block's dynamic shared memory, poisoned likewise
//   launch()          validates the configuration as the CUDA runtime does, then runs the grid
// A CUDA feature without a meaning here (warp shuffles and votes, atomics, fences, cp.async, tensor
// core MMA) is declared below so that using it fails the build with a static_assert naming it;
// inline PTX (asm) fails in the host assembler.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

namespace lorafa::emu {

// The builtins of the running CUDA thread.
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Builtins builtins;

void syncthreads();
unsigned char* dynamic_smem();

// One kernel launch: the configuration, the kernel (for its name and its static shared memory) and
// the body every thread runs, thread_main(args).
struct Launch {
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
  int max_threads;
  const void* kernel;
  void (*thread_main)(void*);
  void* args;
};
void run(const Launch& launch);

template <typename...>
inline constexpr bool kNotEmulated = false;

}  // namespace lorafa::emu

#define threadIdx (::lorafa::emu::builtins.thread_idx)
#define blockIdx (::lorafa::emu::builtins.block_idx)
#define blockDim (::lorafa::emu::builtins.block_dim)
#define gridDim (::lorafa::emu::builtins.grid_dim)

inline void __syncthreads() { ::lorafa::emu::syncthreads(); }

#define LORAFA_EMU_NOT_EMULATED(name, feature)                                                   \
  template <typename... A>                                                                       \
  void name(A...) {                                                                              \
    static_assert(::lorafa::emu::kNotEmulated<A...>,                                            \
                  "the emulated CUDA device (tests/emulator) has no " feature " (" #name          \
                  "): run this kernel on a GPU, or teach tests/emulator/simt.h the feature");    \
  }
LORAFA_EMU_NOT_EMULATED(__shfl_sync, "warp shuffles")
LORAFA_EMU_NOT_EMULATED(__shfl_up_sync, "warp shuffles")
LORAFA_EMU_NOT_EMULATED(__shfl_down_sync, "warp shuffles")
LORAFA_EMU_NOT_EMULATED(__shfl_xor_sync, "warp shuffles")
LORAFA_EMU_NOT_EMULATED(__ballot_sync, "warp votes")
LORAFA_EMU_NOT_EMULATED(__any_sync, "warp votes")
LORAFA_EMU_NOT_EMULATED(__all_sync, "warp votes")
LORAFA_EMU_NOT_EMULATED(__match_any_sync, "warp votes")
LORAFA_EMU_NOT_EMULATED(__activemask, "warp votes")
LORAFA_EMU_NOT_EMULATED(__reduce_add_sync, "warp reductions")
LORAFA_EMU_NOT_EMULATED(__syncwarp, "warp barriers")
LORAFA_EMU_NOT_EMULATED(__syncthreads_count, "barrier reductions")
LORAFA_EMU_NOT_EMULATED(__syncthreads_and, "barrier reductions")
LORAFA_EMU_NOT_EMULATED(__syncthreads_or, "barrier reductions")
LORAFA_EMU_NOT_EMULATED(atomicAdd, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicSub, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicExch, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicMin, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicMax, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicInc, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicDec, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicCAS, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicAnd, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicOr, "atomics")
LORAFA_EMU_NOT_EMULATED(atomicXor, "atomics")
LORAFA_EMU_NOT_EMULATED(__threadfence, "memory fences")
LORAFA_EMU_NOT_EMULATED(__threadfence_block, "memory fences")
LORAFA_EMU_NOT_EMULATED(__pipeline_memcpy_async, "asynchronous copies (cp.async)")
LORAFA_EMU_NOT_EMULATED(__pipeline_commit, "asynchronous copies (cp.async)")
LORAFA_EMU_NOT_EMULATED(__pipeline_wait_prior, "asynchronous copies (cp.async)")
LORAFA_EMU_NOT_EMULATED(clock64, "clocks")
LORAFA_EMU_NOT_EMULATED(__nanosleep, "clocks")
namespace nvcuda::wmma {
template <typename... T>
struct fragment {
  static_assert(::lorafa::emu::kNotEmulated<T...>,
                "the emulated CUDA device (tests/emulator) has no tensor-core MMA (nvcuda::wmma)");
};
LORAFA_EMU_NOT_EMULATED(load_matrix_sync, "tensor-core MMA (nvcuda::wmma)")
LORAFA_EMU_NOT_EMULATED(mma_sync, "tensor-core MMA (nvcuda::wmma)")
LORAFA_EMU_NOT_EMULATED(store_matrix_sync, "tensor-core MMA (nvcuda::wmma)")
}  // namespace nvcuda::wmma
#undef LORAFA_EMU_NOT_EMULATED

namespace lorafa::cuda {

using std::max;
using std::min;

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(::lorafa::emu::dynamic_smem());
}

// launch.h's launch(config, kernel, args...) on the emulated device. The arguments are converted to
// the kernel's parameter types once, as the CUDA runtime copies them, and each thread receives its
// own copy.
template <typename Config, typename... Params, typename... Args>
void launch(const Config& config, void (*kernel)(Params...), Args... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<Params...> params;
  } call{kernel, std::tuple<Params...>(static_cast<Params>(args)...)};
  ::lorafa::emu::run({config.grid, config.block, config.smem, config.stream, config.max_threads,
                      reinterpret_cast<const void*>(kernel),
                      [](void* p) {
                        auto* c = static_cast<Call*>(p);
                        std::apply(c->kernel, c->params);
                      },
                      &call});
}

}  // namespace lorafa::cuda
