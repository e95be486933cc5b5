// Constants and types shared by the kernels (kernels/*.cuh). Each kernel header depends only on this,
// ../device.h (the CUDA vocabulary) and ../../philox.h; none sees an at::Tensor.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../../philox.h"
#include "../device.h"

namespace lorafa::cuda {

constexpr int kThreads = 256;  // threads of a project / expand / grad_b block (their __launch_bounds__)
constexpr int kTile = 32;      // project / grad_b tile edge; the rank-tile depth of expand
constexpr int kExpTile = 64;   // expand tile edge (rows and columns)

// Accumulation type of a kernel on element type T: double for double, else float.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace lorafa::cuda
