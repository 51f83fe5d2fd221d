// Declarations shared by the bindings and the kernels.
//
// Shape legend: B examples, T tokens, I = d_in (+1 for a bias column), O = d_out,
// KI / KO = kept input / output columns, KP = KO * KI, K = compressed size, P = vector length.
//
// Conventions (grass_llm/kernels/reference.py is the executable spec):
//   * idx_in / idx_out are int64 column indices; an idx_in entry equal to x.size(-1) selects a
//     constant 1 (the bias column), so the bias never has to be appended in memory.
//   * An SJLT is passed as the CSR of its transpose: output j is
//       scale * sum_{e in [indptr[j], indptr[j+1])} sgn[e] * v[src[e]],
//     a gather in a fixed order. No atomics, so every result is bitwise reproducible.
//   * Accumulation is float32 for float16 / bfloat16 / float32 inputs and float64 for float64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace grass {

// Per-example FactGraSS: [B, T, I] x [B, T, O] -> [B, K] (per_token=false) or [B, T, K].
at::Tensor factgrass_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                         const at::Tensor& idx_out, const at::Tensor& indptr,
                         const at::Tensor& src, const at::Tensor& sgn, double scale,
                         bool per_token);
// SJLT on a batch of vectors: [B, P] -> [B, K].
at::Tensor sjlt_cpu(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                    const at::Tensor& sgn, double scale);
// Transpose SJLT: [B, K] -> [B, P], out[b, s] = scale * sum_r signs[r, s] * y[b, rows[r, s]].
at::Tensor sjlt_t_cpu(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                      double scale);

#ifdef GRASS_WITH_CUDA
at::Tensor factgrass_cuda(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                          const at::Tensor& idx_out, const at::Tensor& indptr,
                          const at::Tensor& src, const at::Tensor& sgn, double scale,
                          bool per_token);
at::Tensor sjlt_cuda(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                     const at::Tensor& sgn, double scale);
at::Tensor sjlt_t_cuda(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                       double scale);
#endif

// float64 stays float64, every other float type accumulates in float32 (the bindings require
// x and delta to be both float64 or both not).
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
