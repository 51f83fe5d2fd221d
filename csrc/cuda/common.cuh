// Host-side helpers of the CUDA launchers: grid sizes and the SJLT gather's launch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "device.cuh"

namespace grass {
namespace cuda_detail {

inline unsigned grid_yz(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, kMaxGridYZ)));
}

inline unsigned grid_1d(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(ceil_div(items, per_block), kMaxBlocks1D)));
}

template <typename v_t, typename acc_t>
void launch_csr_gather(const v_t* v, int64_t B, int64_t P, const at::Tensor& indptr,
                       const at::Tensor& src, const at::Tensor& sgn, double scale, int64_t K,
                       acc_t* out, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(ceil_div(K, kThreads)), grid_yz(B));
  csr_gather_kernel<v_t, acc_t><<<grid, kThreads, 0, stream>>>(
      v, B, P, indptr.data_ptr<int64_t>(), src.data_ptr<int64_t>(), sgn.data_ptr<float>(),
      static_cast<acc_t>(scale), K, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace grass
