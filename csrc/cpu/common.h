// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace grass {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// at::parallel_for grain for items of `work` multiply-adds each: small calls run inline on the
// calling thread, since waking the pool costs more than they do, and on a busy machine a
// parallel region waits for its slowest (descheduled) thread.
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kMinWork = int64_t{1} << 18;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work));
}

// The input-column mask, prepared once per call: indices clamped into the row, and the
// positions whose index equals the row width (the bias column, read as 1). Keeping the
// branch out of the gather loop lets the compiler use vector gathers.
struct Columns {
  std::vector<int64_t> idx, ones;
  Columns(const int64_t* raw, int64_t n, int64_t width) : idx(raw, raw + n) {
    for (int64_t i = 0; i < n; ++i) {
      if (idx[i] == width) {
        ones.push_back(i);
        idx[i] = 0;
      }
    }
  }
};

// Gather n columns of one row into acc_t (no bias column: delta rows). Kept scalar: GCC's
// vectorized form (AVX-512 gathers with 64-bit indices) ran at 0.6x the scalar loop's rate.
#if defined(__GNUC__) && !defined(__clang__)
#define GRASS_SCALAR_LOOP __attribute__((optimize("no-tree-vectorize")))
#else
#define GRASS_SCALAR_LOOP
#endif
template <typename scalar_t, typename acc_t>
GRASS_SCALAR_LOOP inline void gather_plain(const scalar_t* __restrict__ row, const int64_t* __restrict__ idx,
                         int64_t n, acc_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(row[idx[i]]);
}

template <typename scalar_t, typename acc_t>
inline void gather_cols(const scalar_t* row, const Columns& cols, acc_t* out) {
  gather_plain(row, cols.idx.data(), static_cast<int64_t>(cols.idx.size()), out);
  for (int64_t p : cols.ones) out[p] = acc_t(1);
}

// The same gather for `rows` rows (x rows ldx apart, out rows ldo apart), in one loop nest:
// a call per row to the scalar loop above (which the optimize attribute keeps from being
// inlined) cost as much again as the gather itself on rows of a few hundred values.
template <typename scalar_t, typename acc_t>
GRASS_SCALAR_LOOP void gather_rows(const scalar_t* __restrict__ x, int64_t ldx, int64_t rows,
                                   const Columns& cols, acc_t* __restrict__ out, int64_t ldo) {
  const int64_t* __restrict__ idx = cols.idx.data();
  const int64_t n = static_cast<int64_t>(cols.idx.size());
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * ldx;
    acc_t* o = out + r * ldo;
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<acc_t>(row[idx[i]]);
    for (int64_t p : cols.ones) o[p] = acc_t(1);
  }
}

// out[j] = scale * sum_{e in row j of the CSR} sgn[e] * v[src[e]], for j in [j0, j1).
template <typename v_t, typename acc_t>
inline void csr_gather(const v_t* v, const int64_t* indptr, const int64_t* src,
                       const float* sgn, int64_t j0, int64_t j1, acc_t scale, acc_t* out) {
  for (int64_t j = j0; j < j1; ++j) {
    acc_t s = 0;
    for (int64_t e = indptr[j]; e < indptr[j + 1]; ++e) {
      s += static_cast<acc_t>(sgn[e]) * static_cast<acc_t>(v[src[e]]);
    }
    out[j] = s * scale;
  }
}

// Index-table checks on the host, with plain loops: an ATen reduction per table (min, max,
// .item()) costs more than a small kernel call itself.
inline void check_range(const at::Tensor& t, int64_t stop, const char* name, const char* what) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  if (n == 0) return;
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK(lo >= 0 && hi < stop, name, " entries must lie in ", what, ", got values in [",
              lo, ", ", hi, "]");
}

// indptr [K+1] a CSR from 0 to nnz = len(src), src entries in [0, width).
inline void check_csr_host(const at::Tensor& indptr, const at::Tensor& src, int64_t width,
                           const char* width_name) {
  const int64_t* ip = indptr.data_ptr<int64_t>();
  const int64_t k = indptr.numel() - 1;
  TORCH_CHECK(ip[0] == 0 && ip[k] == src.numel(), "indptr must run from 0 to nnz=",
              src.numel());
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(ip[j] <= ip[j + 1], "indptr must be non-decreasing");
  }
  check_range(src, width, "src", width_name);
}

}  // namespace grass
