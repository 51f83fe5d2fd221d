// The transpose-SJLT kernel (device code only; launched by sjlt_cuda.cu). The forward SJLT is
// device.cuh's CSR gather.
#pragma once

#include "device.cuh"

namespace grass {
namespace cuda_detail {

// out[b, s] = scale * sum_r signs[r, s] * y[b, rows[r, s]];
// grid (ceil(P / kThreads), min(B, 65535)), rows beyond it by striding.
template <typename y_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sjlt_t_kernel(
    const y_t* __restrict__ y, const int64_t* __restrict__ rows,
    const float* __restrict__ signs, int64_t B, int64_t C, int64_t P, int64_t K, acc_t scale,
    acc_t* __restrict__ out) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= P) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t v = 0;
    for (int64_t r = 0; r < C; ++r) {
      v += static_cast<acc_t>(signs[r * P + s]) * static_cast<acc_t>(y[b * K + rows[r * P + s]]);
    }
    out[b * P + s] = v * scale;
  }
}

}  // namespace cuda_detail
}  // namespace grass
