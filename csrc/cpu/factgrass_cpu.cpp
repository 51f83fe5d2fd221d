// FactGraSS on the CPU, parallel over examples and token chunks (at::parallel_for, OpenMP).
//
// Per example b:  M = sum_t delta_t[S_out] x_t[S_in]^T  ([KO, KI]),  out = SJLT(vec(M)).
// Phase 1 gathers the kept columns of a chunk of tokens into thread-local buffers (float32,
// or float64) and accumulates M with a register-blocked micro-kernel; phase 2 sums the chunks
// in a fixed order and applies the SJLT as a gather. The per-token variant forms each token's
// rank-1 M in a thread-local buffer and gathers from it: nothing of size T * KP is allocated.
#include <cstring>
#include <vector>

#include "../grass_kernels.h"
#include "common.h"

namespace grass {
namespace {

constexpr int64_t kTokenChunk = 256;  // tokens per partial M; the CUDA kernel uses the same
constexpr int64_t kBO = 6;            // rows of M per register block

// 32-byte vectors through GCC/Clang vector extensions: the compiler maps them to AVX/AVX2,
// AVX-512 halves or pairs of NEON registers, whichever -march allows.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;

// M[o0 : o0+kBO, i0 : i0+2W] += ds[:, o0 : o0+kBO]^T xs[:, i0 : i0+2W] with every accumulator
// in a register (kBO x 2 vectors): the tokens stream through once per block.
template <typename acc_t>
void full_block(const acc_t* __restrict__ ds, const acc_t* __restrict__ xs, int64_t T,
                int64_t KO, int64_t KI, int64_t o0, int64_t i0, acc_t* __restrict__ M) {
  using V = vec_t<acc_t>;
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  V acc[kBO][2] = {};
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* xr = xs + t * KI + i0;
    const acc_t* dr = ds + t * KO + o0;
    V x0, x1;
    std::memcpy(&x0, xr, sizeof(V));  // unaligned loads
    std::memcpy(&x1, xr + W, sizeof(V));
#pragma GCC unroll 8
    for (int64_t a = 0; a < kBO; ++a) {
      const V dv = V{} + dr[a];
      acc[a][0] += dv * x0;
      acc[a][1] += dv * x1;
    }
  }
  for (int64_t a = 0; a < kBO; ++a) {
    acc_t* mrow = M + (o0 + a) * KI + i0;
    for (int64_t v = 0; v < W; ++v) {
      mrow[v] += acc[a][0][v];
      mrow[W + v] += acc[a][1][v];
    }
  }
}

// The same for a ragged edge block (no rows x ni columns), scalar.
template <typename acc_t>
void edge_block(const acc_t* ds, const acc_t* xs, int64_t T, int64_t KO, int64_t KI, int64_t o0,
                int64_t i0, int64_t no, int64_t ni, acc_t* M) {
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* xr = xs + t * KI + i0;
    const acc_t* dr = ds + t * KO + o0;
    for (int64_t a = 0; a < no; ++a) {
      acc_t* mrow = M + (o0 + a) * KI + i0;
      for (int64_t v = 0; v < ni; ++v) mrow[v] += dr[a] * xr[v];
    }
  }
}

// M[KO, KI] += ds[T, KO]^T xs[T, KI].
template <typename acc_t>
void accumulate_outer(const acc_t* ds, const acc_t* xs, int64_t T, int64_t KO, int64_t KI,
                      acc_t* M) {
  constexpr int64_t BI = 2 * sizeof(vec_t<acc_t>) / sizeof(acc_t);
  const int64_t KO_full = KO - KO % kBO, KI_full = KI - KI % BI;
  for (int64_t o0 = 0; o0 < KO_full; o0 += kBO) {
    for (int64_t i0 = 0; i0 < KI_full; i0 += BI) full_block(ds, xs, T, KO, KI, o0, i0, M);
  }
  if (KI_full < KI) edge_block(ds, xs, T, KO, KI, 0, KI_full, KO_full, KI - KI_full, M);
  if (KO_full < KO) edge_block(ds, xs, T, KO, KI, KO_full, 0, KO - KO_full, KI, M);
}

struct Dims {
  int64_t B, T, I, O, KI, KO, KP, K;
};

template <typename x_t, typename d_t, typename acc_t>
void per_example(const at::Tensor& x, const at::Tensor& d, const int64_t* idx_in,
                 const int64_t* idx_out, const int64_t* indptr, const int64_t* src,
                 const float* sgn, acc_t scale, const Dims& n, at::Tensor& out) {
  // Fixed-size token chunks give every thread work when B is small, and, being independent
  // of the thread count, keep the summation order (and so every bit) the same on any machine.
  const int64_t Tc = kTokenChunk;
  const int64_t S = (n.T + Tc - 1) / Tc;
  auto part = at::zeros({n.B, S, n.KP}, out.options());
  acc_t* part_p = part.data_ptr<acc_t>();
  const x_t* x_p = x.data_ptr<x_t>();
  const d_t* d_p = d.data_ptr<d_t>();
  const int64_t chunk_work = std::min(n.T, Tc) * (n.KP + n.KI + n.KO);
  at::parallel_for(0, n.B * S, grain_for(chunk_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(Tc * n.KI), ds(Tc * n.KO);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S, t0 = (task % S) * Tc, t1 = std::min(n.T, t0 + Tc);
      for (int64_t t = t0; t < t1; ++t) {
        gather_row(x_p + (b * n.T + t) * n.I, n.I, idx_in, n.KI, xs.data() + (t - t0) * n.KI);
        gather_row(d_p + (b * n.T + t) * n.O, n.O, idx_out, n.KO, ds.data() + (t - t0) * n.KO);
      }
      if (t1 > t0) {
        accumulate_outer(ds.data(), xs.data(), t1 - t0, n.KO, n.KI, part_p + task * n.KP);
      }
    }
  });
  acc_t* out_p = out.data_ptr<acc_t>();
  const int64_t nnz = indptr[n.K];
  at::parallel_for(0, n.B, grain_for(S * n.KP + nnz), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* m = part_p + b * S * n.KP;
      for (int64_t s = 1; s < S; ++s) {  // fixed order: reproducible sums
        const acc_t* ms = m + s * n.KP;
        for (int64_t e = 0; e < n.KP; ++e) m[e] += ms[e];
      }
      csr_gather(m, indptr, src, sgn, 0, n.K, scale, out_p + b * n.K);
    }
  });
}

template <typename x_t, typename d_t, typename acc_t>
void per_token(const at::Tensor& x, const at::Tensor& d, const int64_t* idx_in,
               const int64_t* idx_out, const int64_t* indptr, const int64_t* src,
               const float* sgn, acc_t scale, const Dims& n, at::Tensor& out) {
  const x_t* x_p = x.data_ptr<x_t>();
  const d_t* d_p = d.data_ptr<d_t>();
  acc_t* out_p = out.data_ptr<acc_t>();
  const int64_t nnz = indptr[n.K];
  at::parallel_for(0, n.B * n.T, grain_for(n.KP + nnz), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(n.KI), ds(n.KO), m(n.KP);
    for (int64_t row = begin; row < end; ++row) {
      gather_row(x_p + row * n.I, n.I, idx_in, n.KI, xs.data());
      gather_row(d_p + row * n.O, n.O, idx_out, n.KO, ds.data());
      for (int64_t o = 0; o < n.KO; ++o) {
        const acc_t dv = ds[o];
        acc_t* mrow = m.data() + o * n.KI;
        for (int64_t i = 0; i < n.KI; ++i) mrow[i] = dv * xs[i];
      }
      csr_gather(m.data(), indptr, src, sgn, 0, n.K, scale, out_p + row * n.K);
    }
  });
}

}  // namespace

at::Tensor factgrass_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                         const at::Tensor& idx_out, const at::Tensor& indptr,
                         const at::Tensor& src, const at::Tensor& sgn, double scale,
                         bool per_token_out) {
  Dims n{x.size(0), x.size(1), x.size(2), d.size(2), idx_in.numel(), idx_out.numel(), 0,
         indptr.numel() - 1};
  n.KP = n.KI * n.KO;
  // Index ranges are checked here (cheap next to the work), so a bad table cannot read
  // outside x or delta.
  TORCH_CHECK(idx_in.min().item<int64_t>() >= 0 && idx_in.max().item<int64_t>() <= n.I,
              "idx_in entries must lie in [0, ", n.I, "]");
  TORCH_CHECK(idx_out.min().item<int64_t>() >= 0 && idx_out.max().item<int64_t>() < n.O,
              "idx_out entries must lie in [0, ", n.O, ")");
  TORCH_CHECK(src.numel() == 0 || (src.min().item<int64_t>() >= 0 &&
                                   src.max().item<int64_t>() < n.KP),
              "src entries must lie in [0, KI*KO=", n.KP, ")");
  TORCH_CHECK(indptr[-1].item<int64_t>() == src.numel() && indptr[0].item<int64_t>() == 0,
              "indptr must run from 0 to nnz=", src.numel());
  auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor out = per_token_out ? at::empty({n.B, n.T, n.K}, opts) : at::empty({n.B, n.K}, opts);
  GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cpu", [&] {
    using acc_t = acc_of<x_t>;
    if (per_token_out) {
      per_token<x_t, d_t, acc_t>(x, d, idx_in.data_ptr<int64_t>(), idx_out.data_ptr<int64_t>(),
                                 indptr.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
                                 sgn.data_ptr<float>(), static_cast<acc_t>(scale), n, out);
    } else {
      per_example<x_t, d_t, acc_t>(x, d, idx_in.data_ptr<int64_t>(),
                                   idx_out.data_ptr<int64_t>(), indptr.data_ptr<int64_t>(),
                                   src.data_ptr<int64_t>(), sgn.data_ptr<float>(),
                                   static_cast<acc_t>(scale), n, out);
    }
  });
  return out;
}

}  // namespace grass
