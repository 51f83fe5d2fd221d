// SJLT and its transpose on CUDA. The forward map gathers through the CSR of the transpose
// (one thread per output, fixed summation order): no atomics, so no contention between
// colliding buckets and bitwise-reproducible results.
#include "../grass_kernels.h"
#include "common.cuh"
#include "sjlt_kernels.cuh"

namespace grass {

using cuda_detail::acc_of;
using cuda_detail::ceil_div;
using cuda_detail::kThreads;
using cuda_detail::sjlt_t_kernel;

at::Tensor sjlt_cuda(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                     const at::Tensor& sgn, double scale) {
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t B = g.size(0), P = g.size(1), K = indptr.numel() - 1;
  at::Tensor out = at::empty({B, K}, g.options().dtype(acc_dtype(g)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sjlt_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    cuda_detail::launch_csr_gather<scalar_t, acc_t>(g.data_ptr<scalar_t>(), B, P, indptr, src,
                                                    sgn, scale, K, out.data_ptr<acc_t>(),
                                                    stream.stream());
  });
  return out;
}

at::Tensor sjlt_t_cuda(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                       double scale) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t B = y.size(0), K = y.size(1), C = rows.size(0), P = rows.size(1);
  at::Tensor out = at::empty({B, P}, y.options().dtype(acc_dtype(y)));
  if (P == 0) return out;  // nothing to compute, and a zero-sized grid is a launch error
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(static_cast<unsigned>(ceil_div(P, kThreads)), cuda_detail::grid_yz(B));
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
