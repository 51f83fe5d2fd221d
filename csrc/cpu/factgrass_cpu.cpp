// FactGraSS on the CPU, parallel over examples and token chunks (at::parallel_for, OpenMP).
//
// Per example b:  M = sum_t delta_t[S_out] x_t[S_in]^T  ([KO, KI]),  out = SJLT(vec(M)).
// Each task takes one example's 256-token chunk: it gathers (and upcasts) the kept columns of x
// into a thread-local buffer, unless x is read as it is (a features tensor that keeps every
// column), copies delta's kept columns into a dense [tokens, KO] buffer (read in place, each
// tile's few scattered columns of a wide delta row missed the cache: the copy made the kernel
// 10-25% faster at SmolLM2's shapes, O = 576 and 1536), and forms the chunk's M with the
// register-tiled loop of outer_tile.h. With one chunk per example the task applies the SJLT (a
// gather, common.h) right away; otherwise the chunks' M are summed in a fixed order first. The
// per-token variant forms each token's rank-1 M in a thread-local buffer and gathers from it:
// nothing of size T * KP is allocated.
#include <vector>

#include "../grass_kernels.h"
#include "common.h"
#include "outer_tile.h"

namespace grass {
namespace {

constexpr int64_t kTokenChunk = 256;  // tokens per partial M; the CUDA kernel uses the same

struct Dims {
  int64_t B, T, I, O, KI, KO, KP, K;
};

// Whether xs can be read straight from x: every column kept in order (no gather, no bias),
// already in the accumulation type, and whole vectors wide (outer_sum reads padded rows).
template <typename x_t, typename acc_t>
bool reads_x_directly(const Columns& in, int64_t I) {
  if (!std::is_same_v<x_t, acc_t> || !in.ones.empty() ||
      static_cast<int64_t>(in.idx.size()) != I || padded_width<acc_t>(I) != I) {
    return false;
  }
  for (int64_t i = 0; i < I; ++i) {
    if (in.idx[i] != i) return false;
  }
  return true;
}

template <typename x_t, typename d_t, typename acc_t>
void per_example(const at::Tensor& x, const at::Tensor& d, const Columns& in,
                 const int64_t* idx_out, const int64_t* indptr, const int64_t* src,
                 const float* sgn, acc_t scale, const Dims& n, at::Tensor& out) {
  // Fixed-size token chunks give every thread work when B is small, and, being independent
  // of the thread count, keep the summation order (and so every bit) the same on any machine.
  // With one chunk per example (T <= 256) each task forms its M and applies the SJLT at once.
  const int64_t Tc = kTokenChunk;
  const int64_t S = (n.T + Tc - 1) / Tc;
  const int64_t KIp = padded_width<acc_t>(n.KI);
  const bool direct = reads_x_directly<x_t, acc_t>(in, n.I);
  at::Tensor part = S > 1 ? at::empty({n.B, S, n.KP}, out.options()) : at::Tensor();
  acc_t* part_p = S > 1 ? part.data_ptr<acc_t>() : nullptr;
  acc_t* out_p = out.data_ptr<acc_t>();
  const x_t* x_p = x.data_ptr<x_t>();
  const d_t* d_p = d.data_ptr<d_t>();
  const int64_t nnz = indptr[n.K];
  const int64_t chunk_work = std::min(n.T, Tc) * (n.KP + n.KI + n.KO) + (S > 1 ? 0 : nnz);
  const Columns out_cols(idx_out, n.KO, n.O);  // delta's kept columns (no bias column)
  std::vector<int64_t> iota(n.KO);  // the tile loop's columns of the dense delta buffer
  for (int64_t o = 0; o < n.KO; ++o) iota[o] = o;
  at::parallel_for(0, n.B * S, grain_for(chunk_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(direct ? 0 : Tc * KIp), m(S > 1 ? 0 : n.KP), ds(Tc * n.KO);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S, t0 = (task % S) * Tc, t1 = std::min(n.T, t0 + Tc);
      const acc_t* xrows;
      int64_t ldx;
      if (direct) {
        xrows = reinterpret_cast<const acc_t*>(x_p) + (b * n.T + t0) * n.I;
        ldx = n.I;
      } else {
        gather_rows(x_p + (b * n.T + t0) * n.I, n.I, t1 - t0, in, xs.data(), KIp);
        xrows = xs.data();
        ldx = KIp;
      }
      acc_t* mt = S > 1 ? part_p + task * n.KP : m.data();
      gather_rows(d_p + (b * n.T + t0) * n.O, n.O, t1 - t0, out_cols, ds.data(), n.KO);
      outer_sum(xrows, ldx, ds.data(), n.KO, iota.data(), t1 - t0, n.KO, n.KI, mt);
      if (S == 1) csr_gather(mt, indptr, src, sgn, 0, n.K, scale, out_p + b * n.K);
    }
  });
  if (S == 1) return;
  at::parallel_for(0, n.B, grain_for(S * n.KP + nnz), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* mb = part_p + b * S * n.KP;
      for (int64_t s = 1; s < S; ++s) {  // fixed order: reproducible sums
        const acc_t* ms = mb + s * n.KP;
        for (int64_t e = 0; e < n.KP; ++e) mb[e] += ms[e];
      }
      csr_gather(mb, indptr, src, sgn, 0, n.K, scale, out_p + b * n.K);
    }
  });
}

template <typename x_t, typename d_t, typename acc_t>
void per_token(const at::Tensor& x, const at::Tensor& d, const Columns& in,
               const int64_t* idx_out, const int64_t* indptr, const int64_t* src,
               const float* sgn, acc_t scale, const Dims& n, at::Tensor& out) {
  const x_t* x_p = x.data_ptr<x_t>();
  const d_t* d_p = d.data_ptr<d_t>();
  acc_t* out_p = out.data_ptr<acc_t>();
  const int64_t nnz = indptr[n.K];
  at::parallel_for(0, n.B * n.T, grain_for(n.KP + nnz), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(n.KI), ds(n.KO), m(n.KP);
    for (int64_t row = begin; row < end; ++row) {
      gather_cols(x_p + row * n.I, in, xs.data());
      gather_plain(d_p + row * n.O, idx_out, n.KO, ds.data());
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
  // Index ranges are checked here too, on the host tables with plain loops (no ATen call:
  // cheap next to the work), so a bad table cannot read outside x or delta.
  check_range(idx_in, n.I + 1, "idx_in", "[0, I] (I: the bias column)");
  check_range(idx_out, n.O, "idx_out", "[0, O)");
  check_csr_host(indptr, src, n.KP, "KI*KO");
  auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor out = per_token_out ? at::empty({n.B, n.T, n.K}, opts) : at::empty({n.B, n.K}, opts);
  const Columns in(idx_in.data_ptr<int64_t>(), n.KI, n.I);
  GRASS_DISPATCH_PAIR(x.scalar_type(), d.scalar_type(), "factgrass_cpu", [&] {
    using acc_t = acc_of<x_t>;
    if (per_token_out) {
      per_token<x_t, d_t, acc_t>(x, d, in, idx_out.data_ptr<int64_t>(),
                                 indptr.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
                                 sgn.data_ptr<float>(), static_cast<acc_t>(scale), n, out);
    } else {
      per_example<x_t, d_t, acc_t>(x, d, in, idx_out.data_ptr<int64_t>(),
                                   indptr.data_ptr<int64_t>(),
                                   src.data_ptr<int64_t>(), sgn.data_ptr<float>(),
                                   static_cast<acc_t>(scale), n, out);
    }
  });
  return out;
}

}  // namespace grass
