// The fused FactGraSS kernels (device code only; launched by factgrass_cuda.cu).
//
// Per example:  M = sum_t delta_t[S_out] x_t[S_in]^T  ([KO, KI]),  out = SJLT(vec(M)).
// Kernel 1 (masked_outer_kernel): a block owns a 64x64 tile of M for one example and one
// 64-token chunk; it stages 16 tokens at a time of the gathered (and upcast) x and delta
// columns in shared memory and keeps the tile in registers (4x4 per thread), so neither the
// gathered features nor G ever reach global memory. It writes its finished tile once (no
// atomics). Kernel 2 sums the chunks of each example in a fixed order (coalesced), kernel 3
// applies the SJLT as a gather (device.cuh). The chunk size is fixed, not derived from the
// GPU or the batch: an example's bits are the same on every GPU and in any batch. 64 tokens
// (not 256, the CPU's) give Llama-8B's shapes (KI = KO = 128: 4 tiles) at B = 8, T = 1024 512
// blocks instead of 128 on a 132-SM GPU; the partial tiles cost 4 * KP / 64 bytes per token
// (1 KiB at KP = 16384), an eighth of the bf16 x row the layer reads anyway.
//
// Per-token variant: one row per token, out[row] = SJLT(vec(delta_row[S_out] x_row[S_in]^T)).
// A small kernel gathers each row's KI + KO kept columns (upcast) once; the main kernel gives
// each block R token rows (16, fewer where their features do not fit in shared memory), laid
// out column-major in shared memory, and each thread walks the CSR of its outputs once for all
// R rows, with the CSR entries' (delta column, x column) precomputed as int32 shared-memory
// offsets: the CSR is read once per R tokens, with no 64-bit divide per entry.
// Results are bitwise reproducible run to run (no atomics anywhere).
#pragma once

#include "device.cuh"

namespace grass {
namespace cuda_detail {

constexpr int kTile = 64;             // M tile edge
constexpr int kStage = 16;            // tokens staged in shared memory per step
constexpr int kSub = 4;               // each of the 16x16 threads owns a kSub x kSub sub-tile
constexpr int64_t kTokenChunk = 64;   // tokens per partial tile (see the header comment)

// grid (tiles, min(S, 65535), min(B, 65535)), block kThreads; tile = o_tile * tiles_i + i_tile.
template <typename x_t, typename d_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) masked_outer_kernel(
    const x_t* __restrict__ x, const d_t* __restrict__ d, const int64_t* __restrict__ idx_in,
    const int64_t* __restrict__ idx_out, int64_t B, int64_t T, int64_t I, int64_t O,
    int64_t KI, int64_t KO, int64_t S, acc_t* __restrict__ part) {
  __shared__ acc_t xs[kStage][kTile];
  __shared__ acc_t ds[kStage][kTile];
  const int64_t tiles_i = ceil_div(KI, kTile);
  const int64_t i0 = (blockIdx.x % tiles_i) * kTile;
  const int64_t o0 = (blockIdx.x / tiles_i) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // Staging: thread k always loads column k % kTile of the tile, for token rows k / kTile +
  // 4 n, so it looks its two column indices up once.
  static_assert(kThreads % kTile == 0 && kStage % (kThreads / kTile) == 0, "staging layout");
  const int c = threadIdx.x % kTile;
  const bool has_x = i0 + c < KI, has_d = o0 + c < KO;
  const int64_t xcol = has_x ? idx_in[i0 + c] : 0, dcol = has_d ? idx_out[o0 + c] : 0;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
      const int64_t t_begin = s * kTokenChunk;
      const int64_t t_end = T < t_begin + kTokenChunk ? T : t_begin + kTokenChunk;
      acc_t acc[kSub][kSub];
#pragma unroll
      for (int r = 0; r < kSub; ++r)
#pragma unroll
        for (int q = 0; q < kSub; ++q) acc[r][q] = 0;
      for (int64_t t0 = t_begin; t0 < t_end; t0 += kStage) {
        for (int tt = threadIdx.x / kTile; tt < kStage; tt += kThreads / kTile) {
          const int64_t t = t0 + tt;
          acc_t xv = 0, dv = 0;
          if (t < t_end) {
            const int64_t row = b * T + t;
            if (has_x) xv = load_col<x_t, acc_t>(x + row * I, I, xcol);
            if (has_d) dv = static_cast<acc_t>(d[row * O + dcol]);
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
  }
}

// m[b, p] = sum_{s < S} part[b, s, p], s ascending. 1-D strided grid.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_chunks_kernel(
    const acc_t* __restrict__ part, int64_t B, int64_t S, int64_t KP, acc_t* __restrict__ m) {
  const int64_t n = B * KP;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = q / KP, p = q - b * KP;
    const acc_t* v = part + b * S * KP + p;
    acc_t total = v[0];
    for (int64_t s = 1; s < S; ++s) total += v[s * KP];
    m[q] = total;
  }
}

// feat[row, c] = x[row, idx_in[c]] (1 for the bias index I) for c < KI, else
// delta[row, idx_out[c - KI]]; in the accumulation type. 1-D strided grid.
template <typename x_t, typename d_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gather_features_kernel(
    const x_t* __restrict__ x, const d_t* __restrict__ d, const int64_t* __restrict__ idx_in,
    const int64_t* __restrict__ idx_out, int64_t rows, int64_t I, int64_t O, int64_t KI,
    int64_t KO, acc_t* __restrict__ feat) {
  const int64_t F = KI + KO, n = rows * F;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = q / F, c = q - row * F;
    feat[q] = c < KI ? load_col<x_t, acc_t>(x + row * I, I, idx_in[c])
                     : static_cast<acc_t>(d[row * O + idx_out[c - KI]]);
  }
}

// Shared-memory row stride of one feature column of R token rows: padded for R = 16 so that
// 16-byte loads of random columns spread over the banks (stride 16 would hit 2 bank groups).
__host__ __device__ constexpr int row_pad(int R) { return R == 16 ? 20 : R; }

// Token rows per block of per_token_kernel: 16 where the F = KI + KO feature columns of 16 rows
// fit in max_smem bytes, else 4, else 1; 0 if not even one row fits. Only how the work is
// split depends on it, never a result's bits.
inline int per_token_rows(int64_t F, int64_t acc_bytes, int64_t max_smem) {
  for (int R = 16; R >= 1; R /= 4) {
    if (F * row_pad(R) * acc_bytes <= max_smem) return R;
  }
  return 0;
}

// pairs[e] = shared-memory offsets (delta column o, x column i) of CSR entry e, where
// src[e] = o * KI + i and column c of the features sits at c * pad. 1-D strided grid.
__global__ void __launch_bounds__(kThreads) csr_pairs_kernel(
    const int64_t* __restrict__ src, int64_t nnz, int64_t KI, int pad,
    int2* __restrict__ pairs) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = src[e], o = p / KI, i = p - o * KI;
    pairs[e] = make_int2(static_cast<int>((KI + o) * pad), static_cast<int>(i * pad));
  }
}

// acc[r] += sg * (dp[r] * xp[r]) for r < R, reading 16-byte-aligned shared memory in
// 16-byte loads where R allows (a few registers live at a time).
template <int R, typename acc_t>
__device__ __forceinline__ void fma_rows(acc_t (&acc)[R], const acc_t* dp, const acc_t* xp,
                                         acc_t sg) {
  if constexpr (std::is_same_v<acc_t, float> && R % 4 == 0) {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      const float4 dv = reinterpret_cast<const float4*>(dp)[q];
      const float4 xv = reinterpret_cast<const float4*>(xp)[q];
      acc[4 * q] += sg * (dv.x * xv.x);
      acc[4 * q + 1] += sg * (dv.y * xv.y);
      acc[4 * q + 2] += sg * (dv.z * xv.z);
      acc[4 * q + 3] += sg * (dv.w * xv.w);
    }
  } else if constexpr (std::is_same_v<acc_t, double> && R % 2 == 0) {
#pragma unroll
    for (int q = 0; q < R / 2; ++q) {
      const double2 dv = reinterpret_cast<const double2*>(dp)[q];
      const double2 xv = reinterpret_cast<const double2*>(xp)[q];
      acc[2 * q] += sg * (dv.x * xv.x);
      acc[2 * q + 1] += sg * (dv.y * xv.y);
    }
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] += sg * (dp[r] * xp[r]);
  }
}

// out[row, j] = scale * sum_{e in CSR row j} sgn[e] * (delta_row[o_e] * x_row[i_e]).
// grid min(ceil(rows / R), kMaxBlocks1D), block kThreads, dynamic shared memory
// F * row_pad(R) acc_t: column c of the block's R rows at fs[c * pad + r] (rows past the end
// read as 0).
template <int R, typename acc_t>
__global__ void __launch_bounds__(kThreads) per_token_kernel(
    const acc_t* __restrict__ feat, int64_t rows, int F, const int64_t* __restrict__ indptr,
    const int2* __restrict__ pairs, const float* __restrict__ sgn, acc_t scale, int64_t K,
    acc_t* __restrict__ out) {
  constexpr int pad = row_pad(R);
  GRASS_DYNAMIC_SMEM(smem_raw);
  acc_t* fs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t groups = ceil_div(rows, R);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t row0 = g * R;
    const int nr = static_cast<int>(rows - row0 < R ? rows - row0 : R);
    const acc_t* fg = feat + row0 * F;
    for (int e = threadIdx.x; e < R * F; e += kThreads) {
      const int r = e / F, c = e - r * F;
      fs[c * pad + r] = r < nr ? fg[e] : acc_t(0);
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < K; j += kThreads) {
      acc_t acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0;
      const int64_t e1 = indptr[j + 1];
      for (int64_t e = indptr[j]; e < e1; ++e) {
        const int2 oi = pairs[e];
        fma_rows<R, acc_t>(acc, fs + oi.x, fs + oi.y, static_cast<acc_t>(sgn[e]));
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nr) out[(row0 + r) * K + j] = acc[r] * scale;
      }
    }
    __syncthreads();
  }
}

}  // namespace cuda_detail
}  // namespace grass
