// Fused FactGraSS on CUDA: input-dependent launch choices (grids, rows per block, shared
// memory) and the kernel sequence; the kernels and their design are in factgrass_kernels.cuh.
#include "../grass_kernels.h"
#include "common.cuh"
#include "factgrass_kernels.cuh"

namespace grass {
namespace {

using namespace cuda_detail;  // NOLINT: the kernels, their constants and the grid helpers

template <int R, typename acc_t>
void launch_per_token(const at::Tensor& feat, int64_t rows, int64_t F, int64_t KI,
                      const at::Tensor& indptr, const at::Tensor& src, const at::Tensor& sgn,
                      double scale, int64_t K, at::Tensor& out, cudaStream_t stream) {
  constexpr int pad = row_pad(R);
  const int64_t nnz = src.numel();
  at::Tensor pairs = at::empty({std::max<int64_t>(nnz, 1), 2}, feat.options().dtype(at::kInt));
  int2* pairs_p = reinterpret_cast<int2*>(pairs.data_ptr<int>());
  if (nnz > 0) {
    csr_pairs_kernel<<<grid_1d(nnz, kThreads), kThreads, 0, stream>>>(
        src.data_ptr<int64_t>(), nnz, KI, pad, pairs_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t smem = static_cast<size_t>(F) * pad * sizeof(acc_t);
  auto kernel = per_token_kernel<R, acc_t>;
  if (smem > 48 * 1024) {  // above the default limit: opt in (the caller checked the maximum)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<grid_1d(rows, R), kThreads, smem, stream>>>(
      feat.data_ptr<acc_t>(), rows, static_cast<int>(F), indptr.data_ptr<int64_t>(), pairs_p,
      sgn.data_ptr<float>(), static_cast<acc_t>(scale), K, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void per_token_product(const at::Tensor& feat, int64_t rows, int64_t KI, int64_t KO,
                       const at::Tensor& indptr, const at::Tensor& src, const at::Tensor& sgn,
                       double scale, int64_t K, at::Tensor& out, cudaStream_t stream) {
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t F = KI + KO;
  switch (per_token_rows(F, sizeof(acc_t), max_smem)) {
    case 16:
      return launch_per_token<16, acc_t>(feat, rows, F, KI, indptr, src, sgn, scale, K, out,
                                         stream);
    case 4:
      return launch_per_token<4, acc_t>(feat, rows, F, KI, indptr, src, sgn, scale, K, out,
                                        stream);
    case 1:
      return launch_per_token<1, acc_t>(feat, rows, F, KI, indptr, src, sgn, scale, K, out,
                                        stream);
    default:
      TORCH_CHECK(false, "per-token FactGraSS needs k_in + k_out <= ",
                  max_smem / static_cast<int64_t>(sizeof(acc_t)), " on this GPU, got ", F);
  }
}

}  // namespace

at::Tensor factgrass_cuda(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                          const at::Tensor& idx_out, const at::Tensor& indptr,
                          const at::Tensor& src, const at::Tensor& sgn, double scale,
                          bool per_token) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), O = d.size(2);
  const int64_t KI = idx_in.numel(), KO = idx_out.numel(), KP = KI * KO;
  const int64_t K = indptr.numel() - 1;
  auto opts = x.options().dtype(acc_dtype(x));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (per_token) {
    const int64_t rows = B * T;
    at::Tensor out = at::empty({B, T, K}, opts);
    at::Tensor feat = at::empty({rows, KI + KO}, opts);
    GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cuda_per_token", [&] {
      using acc_t = acc_of<x_t>;
      gather_features_kernel<x_t, d_t, acc_t><<<grid_1d(rows * (KI + KO), kThreads), kThreads,
                                                0, stream>>>(
          x.data_ptr<x_t>(), d.data_ptr<d_t>(), idx_in.data_ptr<int64_t>(),
          idx_out.data_ptr<int64_t>(), rows, I, O, KI, KO, feat.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      per_token_product<acc_t>(feat, rows, KI, KO, indptr, src, sgn, scale, K, out, stream);
    });
    return out;
  }
  const int64_t tiles = ceil_div(KI, kTile) * ceil_div(KO, kTile);
  const int64_t S = ceil_div(T, kTokenChunk);
  at::Tensor part = at::empty({B, S, KP}, opts);
  at::Tensor out = at::empty({B, K}, opts);
  dim3 grid(static_cast<unsigned>(tiles), grid_yz(S), grid_yz(B));
  GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cuda", [&] {
    using acc_t = acc_of<x_t>;
    masked_outer_kernel<x_t, d_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<x_t>(), d.data_ptr<d_t>(), idx_in.data_ptr<int64_t>(),
        idx_out.data_ptr<int64_t>(), B, T, I, O, KI, KO, S, part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor m = part;
    if (S > 1) {
      m = at::empty({B, KP}, opts);
      sum_chunks_kernel<acc_t><<<grid_1d(B * KP, kThreads), kThreads, 0, stream>>>(
          part.data_ptr<acc_t>(), B, S, KP, m.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda_detail::launch_csr_gather<acc_t, acc_t>(m.data_ptr<acc_t>(), B, KP, indptr, src, sgn,
                                                 scale, K, out.data_ptr<acc_t>(), stream);
  });
  return out;
}

}  // namespace grass
