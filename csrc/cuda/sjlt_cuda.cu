// SJLT and its transpose on CUDA. The forward map gathers through the CSR of the transpose
// (one thread per output, fixed summation order): no atomics, so no contention between
// colliding buckets and bitwise-reproducible results.
#include <algorithm>

#include "../grass_kernels.h"
#include "common.cuh"

namespace grass {
namespace {

using cuda_detail::acc_of;
using cuda_detail::ceil_div;
using cuda_detail::kThreads;

// out[b, s] = scale * sum_r signs[r, s] * y[b, rows[r, s]];
// grid (ceil(P / kThreads), min(B, kMaxGridYZ)), rows beyond it by striding.
template <typename y_t, typename acc_t>
__global__ void sjlt_t_kernel(const y_t* __restrict__ y, const int64_t* __restrict__ rows,
                              const float* __restrict__ signs, int64_t B, int64_t C, int64_t P,
                              int64_t K, acc_t scale, acc_t* __restrict__ out) {
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

}  // namespace

at::Tensor sjlt_cuda(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                     const at::Tensor& sgn, double scale) {
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t B = g.size(0), P = g.size(1), K = indptr.numel() - 1;
  at::Tensor out = at::empty({B, K}, g.options().dtype(acc_dtype(g)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sjlt_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    cuda_detail::launch_csr_gather<scalar_t, acc_t>(g.data_ptr<scalar_t>(), B, 1, P, indptr,
                                                    src, sgn, scale, K,
                                                    out.data_ptr<acc_t>(), stream.stream());
  });
  return out;
}

at::Tensor sjlt_t_cuda(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                       double scale) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t B = y.size(0), K = y.size(1), C = rows.size(0), P = rows.size(1);
  at::Tensor out = at::empty({B, P}, y.options().dtype(acc_dtype(y)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(static_cast<unsigned>(ceil_div(P, kThreads)),
            static_cast<unsigned>(std::min<int64_t>(B, cuda_detail::kMaxGridYZ)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sjlt_t_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    sjlt_t_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream.stream()>>>(
        y.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), signs.data_ptr<float>(), B, C, P, K,
        static_cast<acc_t>(scale), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace grass
