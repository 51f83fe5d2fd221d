// Device-side helpers of the CUDA kernels: plain CUDA C++, no ATen or runtime headers, so the
// kernels (factgrass_kernels.cuh, sjlt_kernels.cuh) can also be compiled by a host compiler for
// a CPU emulation (tests/cuda_emulation.h) that checks their indexing without a GPU.
//
// Grid limits: gridDim.y and gridDim.z are at most 65535 and the 1-D grids are capped, so every
// kernel strides over what its grid does not cover: no input size is refused for the grid.
#pragma once

#include <cstdint>
#include <type_traits>

#ifndef GRASS_DYNAMIC_SMEM  // the emulation defines its own
#define GRASS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace grass {
namespace cuda_detail {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxBlocks1D = 65536;  // cap of the strided 1-D grids

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column j of a row; j == width reads as 1 (the bias column).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_col(const scalar_t* row, int64_t width, int64_t j) {
  return j == width ? acc_t(1) : static_cast<acc_t>(row[j]);
}

// out[b, j] = scale * sum_{e in CSR row j} sgn[e] * v[b, src[e]] for v [B, P]: one thread per
// output, entries in CSR order, so the sum is reproducible and needs no atomics.
// grid (ceil(K / kThreads), min(B, kMaxGridYZ)), block kThreads; rows b beyond it by striding.
template <typename v_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) csr_gather_kernel(
    const v_t* __restrict__ v, int64_t B, int64_t P, const int64_t* __restrict__ indptr,
    const int64_t* __restrict__ src, const float* __restrict__ sgn, acc_t scale, int64_t K,
    acc_t* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= K) return;
  const int64_t e0 = indptr[j], e1 = indptr[j + 1];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const v_t* vb = v + b * P;
    acc_t total = 0;
    for (int64_t e = e0; e < e1; ++e) {
      total += static_cast<acc_t>(sgn[e]) * static_cast<acc_t>(vb[src[e]]);
    }
    out[b * K + j] = total * scale;
  }
}

}  // namespace cuda_detail
}  // namespace grass
