// Device helpers shared by the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

namespace grass {
namespace cuda_detail {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column j of a row; j == width reads as 1 (the bias column).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_col(const scalar_t* row, int64_t width, int64_t j) {
  return j == width ? acc_t(1) : static_cast<acc_t>(row[j]);
}

// out[b, j] = scale * sum_{e in CSR row j} sgn[e] * sum_{s < S} v[b, s, src[e]], where v is
// [B, S, P]. The sum over S and over e runs in a fixed order: reproducible, no atomics.
// grid (ceil(K / kThreads), min(B, kMaxGridYZ)), block kThreads; rows beyond the grid's y
// extent are covered by striding (per-token batches can exceed 65535 rows).
template <typename v_t, typename acc_t>
__global__ void csr_gather_kernel(const v_t* __restrict__ v, int64_t B, int64_t S, int64_t P,
                                  const int64_t* __restrict__ indptr,
                                  const int64_t* __restrict__ src,
                                  const float* __restrict__ sgn, acc_t scale, int64_t K,
                                  acc_t* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= K) return;
  const int64_t e0 = indptr[j], e1 = indptr[j + 1];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const v_t* vb = v + b * S * P;
    acc_t total = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t p = src[e];
      acc_t s = 0;
      for (int64_t si = 0; si < S; ++si) s += static_cast<acc_t>(vb[si * P + p]);
      total += static_cast<acc_t>(sgn[e]) * s;
    }
    out[b * K + j] = total * scale;
  }
}

template <typename v_t, typename acc_t>
void launch_csr_gather(const v_t* v, int64_t B, int64_t S, int64_t P, const at::Tensor& indptr,
                       const at::Tensor& src, const at::Tensor& sgn, double scale, int64_t K,
                       acc_t* out, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(ceil_div(K, kThreads)),
            static_cast<unsigned>(B < kMaxGridYZ ? B : kMaxGridYZ));
  csr_gather_kernel<v_t, acc_t><<<grid, kThreads, 0, stream>>>(
      v, B, S, P, indptr.data_ptr<int64_t>(), src.data_ptr<int64_t>(), sgn.data_ptr<float>(),
      static_cast<acc_t>(scale), K, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace grass
