// Fused FactGraSS on CUDA.
//
// Per example:  M = sum_t delta_t[S_out] x_t[S_in]^T  ([KO, KI]),  out = SJLT(vec(M)).
// Kernel 1 (masked_outer_kernel): a block owns a 64x64 tile of M for one example and one token
// range; it stages 16 tokens at a time of the gathered (and upcast) x and delta columns in
// shared memory and keeps the tile in registers (4x4 per thread), so neither the gathered
// features nor G ever reach global memory. It writes its finished tile once (no atomics).
// Kernel 2 sums the token ranges in a fixed order and applies the SJLT as a gather
// (common.cuh). The token ranges (256 tokens each) fill the GPU when the batch is small; the
// tile buffer they need is B * ceil(T / 256) * KP floats, tiny next to x.
// Results are bitwise reproducible run to run.
//
// Per-token variant: a block per token row gathers its KI + KO columns into shared memory
// and each thread computes outputs j by walking the CSR: no [T, KP] intermediate at all.
#include <algorithm>

#include "../grass_kernels.h"
#include "common.cuh"

namespace grass {
namespace {

using cuda_detail::acc_of;
using cuda_detail::ceil_div;
using cuda_detail::kThreads;
using cuda_detail::load_col;

constexpr int kTile = 64;  // M tile edge
constexpr int kStage = 16;  // tokens staged in shared memory per step
constexpr int kSub = 4;     // each of the 16x16 threads owns a kSub x kSub strided sub-tile
constexpr int64_t kTokenChunk = 256;  // tokens per partial tile; the CPU kernel uses the same

// grid (tiles, S, B), block kThreads. Tile index = o_tile * tiles_i + i_tile.
template <typename x_t, typename d_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_outer_kernel(
    const x_t* __restrict__ x, const d_t* __restrict__ d, const int64_t* __restrict__ idx_in,
    const int64_t* __restrict__ idx_out, int64_t T, int64_t I, int64_t O, int64_t KI,
    int64_t KO, int64_t S, int64_t Tc, acc_t* __restrict__ part) {
  __shared__ acc_t xs[kStage][kTile];
  __shared__ acc_t ds[kStage][kTile];
  const int64_t tiles_i = ceil_div(KI, kTile);
  const int64_t i0 = (blockIdx.x % tiles_i) * kTile;
  const int64_t o0 = (blockIdx.x / tiles_i) * kTile;
  const int64_t s = blockIdx.y, b = blockIdx.z;
  const int64_t t_begin = s * Tc;
  const int64_t t_end = T < t_begin + Tc ? T : t_begin + Tc;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[kSub][kSub];
#pragma unroll
  for (int r = 0; r < kSub; ++r)
#pragma unroll
    for (int q = 0; q < kSub; ++q) acc[r][q] = 0;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kStage) {
    for (int e = threadIdx.x; e < kStage * kTile; e += kThreads) {
      const int tt = e / kTile, c = e % kTile;
      const int64_t t = t0 + tt;
      acc_t xv = 0, dv = 0;
      if (t < t_end) {
        const int64_t row = b * T + t;
        if (i0 + c < KI) xv = load_col<x_t, acc_t>(x + row * I, I, idx_in[i0 + c]);
        if (o0 + c < KO) dv = static_cast<acc_t>(d[row * O + idx_out[o0 + c]]);
      }
      xs[tt][c] = xv;
      ds[tt][c] = dv;
    }
    __syncthreads();
#pragma unroll 4
    for (int tt = 0; tt < kStage; ++tt) {
      acc_t a[kSub], v[kSub];
#pragma unroll
      for (int r = 0; r < kSub; ++r) a[r] = ds[tt][ty + 16 * r];
#pragma unroll
      for (int q = 0; q < kSub; ++q) v[q] = xs[tt][tx + 16 * q];
#pragma unroll
      for (int r = 0; r < kSub; ++r)
#pragma unroll
        for (int q = 0; q < kSub; ++q) acc[r][q] += a[r] * v[q];
    }
    __syncthreads();
  }
  acc_t* out = part + (b * S + s) * KO * KI;
#pragma unroll
  for (int r = 0; r < kSub; ++r) {
    const int64_t o = o0 + ty + 16 * r;
#pragma unroll
    for (int q = 0; q < kSub; ++q) {
      const int64_t i = i0 + tx + 16 * q;
      if (o < KO && i < KI) out[o * KI + i] = acc[r][q];
    }
  }
}

// grid (min(rows, 2^20)), block kThreads, dynamic shared memory (KI + KO) * sizeof(acc_t).
template <typename x_t, typename d_t, typename acc_t>
__global__ void per_token_kernel(const x_t* __restrict__ x, const d_t* __restrict__ d,
                                 const int64_t* __restrict__ idx_in,
                                 const int64_t* __restrict__ idx_out, int64_t rows, int64_t I,
                                 int64_t O, int64_t KI, int64_t KO,
                                 const int64_t* __restrict__ indptr,
                                 const int64_t* __restrict__ src,
                                 const float* __restrict__ sgn, acc_t scale, int64_t K,
                                 acc_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* ds = xs + KI;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int64_t i = threadIdx.x; i < KI; i += blockDim.x) {
      xs[i] = load_col<x_t, acc_t>(x + row * I, I, idx_in[i]);
    }
    for (int64_t o = threadIdx.x; o < KO; o += blockDim.x) {
      ds[o] = static_cast<acc_t>(d[row * O + idx_out[o]]);
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      acc_t s = 0;
      for (int64_t e = indptr[j]; e < indptr[j + 1]; ++e) {
        const int64_t p = src[e];
        s += static_cast<acc_t>(sgn[e]) * ds[p / KI] * xs[p % KI];
      }
      out[row * K + j] = s * scale;
    }
    __syncthreads();
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out;
  if (per_token) {
    out = at::empty({B, T, K}, opts);
    const int64_t rows = B * T;
    GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cuda_per_token", [&] {
      using acc_t = acc_of<x_t>;
      const size_t smem = static_cast<size_t>(KI + KO) * sizeof(acc_t);
      TORCH_CHECK(smem <= 48 * 1024, "per-token FactGraSS needs k_in + k_out <= ",
                  48 * 1024 / sizeof(acc_t), " on CUDA, got ", KI + KO);
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20));
      per_token_kernel<x_t, d_t, acc_t><<<grid, kThreads, smem, stream.stream()>>>(
          x.data_ptr<x_t>(), d.data_ptr<d_t>(), idx_in.data_ptr<int64_t>(),
          idx_out.data_ptr<int64_t>(), rows, I, O, KI, KO, indptr.data_ptr<int64_t>(),
          src.data_ptr<int64_t>(), sgn.data_ptr<float>(), static_cast<acc_t>(scale), K,
          out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  TORCH_CHECK(B <= cuda_detail::kMaxGridYZ, "batch of ", B, " examples exceeds the CUDA grid "
              "limit ", cuda_detail::kMaxGridYZ);
  const int64_t tiles = ceil_div(KI, kTile) * ceil_div(KO, kTile);
  // Token chunks of a fixed size fill the GPU when B is small and, unlike a split by the
  // number of multiprocessors, give the same bits on every GPU model.
  const int64_t Tc = kTokenChunk;
  const int64_t S = ceil_div(T, Tc);
  TORCH_CHECK(S <= cuda_detail::kMaxGridYZ, "sequence of ", T, " tokens is too long");
  at::Tensor part = at::empty({B, S, KP}, opts);
  out = at::empty({B, K}, opts);
  dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(S), static_cast<unsigned>(B));
  GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cuda", [&] {
    using acc_t = acc_of<x_t>;
    masked_outer_kernel<x_t, d_t, acc_t><<<grid, kThreads, 0, stream.stream()>>>(
        x.data_ptr<x_t>(), d.data_ptr<d_t>(), idx_in.data_ptr<int64_t>(),
        idx_out.data_ptr<int64_t>(), T, I, O, KI, KO, S, Tc, part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda_detail::launch_csr_gather<acc_t, acc_t>(part.data_ptr<acc_t>(), B, S, KP, indptr, src,
                                                 sgn, scale, K, out.data_ptr<acc_t>(),
                                                 stream.stream());
  });
  return out;
}

}  // namespace grass
