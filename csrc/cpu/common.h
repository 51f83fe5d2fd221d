// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

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

// Gather n columns of one row into acc_t; an index equal to `width` reads as 1 (bias column).
template <typename scalar_t, typename acc_t>
inline void gather_row(const scalar_t* row, int64_t width, const int64_t* idx, int64_t n,
                       acc_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = idx[i];
    out[i] = j == width ? acc_t(1) : static_cast<acc_t>(row[j]);
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

}  // namespace grass

// Dispatch over the float types of two tensors; the body sees x_t and d_t.
#define GRASS_DISPATCH_PAIR(X_TYPE, D_TYPE, NAME, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_TYPE, NAME, [&] {         \
    using x_t = scalar_t;                                                               \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, D_TYPE, NAME, [&] {       \
      using d_t = scalar_t;                                                             \
      __VA_ARGS__();                                                                    \
    });                                                                                 \
  })
