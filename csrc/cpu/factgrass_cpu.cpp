// FactGraSS on the CPU, parallel over examples and token chunks (at::parallel_for, OpenMP).
//
// Per example b:  M = sum_t delta_t[S_out] x_t[S_in]^T  ([KO, KI]),  out = SJLT(vec(M)).
// Phase 1 gathers (and upcasts) the kept columns of a 256-token chunk into thread-local
// buffers and forms the chunk's M with one BLAS GEMM (single-threaded inside the task; a
// hand-written register-blocked kernel reached about half of MKL's rate here); phase 2 sums the
// chunks in a fixed order and applies the SJLT as a gather. The per-token variant forms each
// token's rank-1 M in a thread-local buffer and gathers from it: nothing of size T * KP is
// allocated.
#include <vector>

#include "../grass_kernels.h"
#include "common.h"

namespace grass {
namespace {

constexpr int64_t kTokenChunk = 256;  // tokens per partial M; the CUDA kernel uses the same

struct Dims {
  int64_t B, T, I, O, KI, KO, KP, K;
};

template <typename x_t, typename d_t, typename acc_t>
void per_example(const at::Tensor& x, const at::Tensor& d, const Columns& in,
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
        gather_cols(x_p + (b * n.T + t) * n.I, in, xs.data() + (t - t0) * n.KI);
        gather_plain(d_p + (b * n.T + t) * n.O, idx_out, n.KO, ds.data() + (t - t0) * n.KO);
      }
      if (t1 > t0) {  // M_chunk = ds^T xs through BLAS (single-threaded inside this task)
        const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
        at::Tensor m = at::from_blob(part_p + task * n.KP, {n.KO, n.KI}, opts);
        at::mm_out(m, at::from_blob(ds.data(), {t1 - t0, n.KO}, opts).t(),
                   at::from_blob(xs.data(), {t1 - t0, n.KI}, opts));
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
