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
//   * Index ranges: the bindings check shapes, dtypes, devices and contiguity on every call;
//     the *values* of the tables (every index in range, indptr a CSR) are checked once per
//     table by grass_llm/kernels/tables.py before any kernel runs. The CPU kernels check them
//     again (cheap there); the CUDA kernels trust them (a check would cost a synchronization).
//
// Only the light ATen headers here: the .cu files compile much faster without ATen/ATen.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

namespace grass {

// The checked entry points (bindings.cpp), for callers inside the extension.
at::Tensor factgrass(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                     const at::Tensor& idx_out, const at::Tensor& indptr, const at::Tensor& src,
                     const at::Tensor& sgn, double scale, bool per_token);
at::Tensor gather_columns(const at::Tensor& x, const at::Tensor& idx);

// Per-example FactGraSS: [B, T, I] x [B, T, O] -> [B, K] (per_token=false) or [B, T, K].
at::Tensor factgrass_cpu(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                         const at::Tensor& idx_out, const at::Tensor& indptr,
                         const at::Tensor& src, const at::Tensor& sgn, double scale,
                         bool per_token);
// The kept columns of x: [..., I] -> [..., KI] (accumulation type; index I reads as 1).
at::Tensor gather_columns_cpu(const at::Tensor& x, const at::Tensor& idx);
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

// The float types that accumulate in float32.
#define GRASS_CASES_FP32_ACC(...)                        \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)   \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

// Dispatch over the float types of two tensors; the body sees x_t and d_t. Only the pairs the
// bindings accept are instantiated: (double, double), or both of float / half / bfloat16.
#define GRASS_DISPATCH_PAIR(X_TYPE, D_TYPE, NAME, ...)                                    \
  do {                                                                                    \
    if ((X_TYPE) == at::kDouble) {                                                        \
      TORCH_CHECK((D_TYPE) == at::kDouble, NAME, ": x is float64 but delta is ", D_TYPE); \
      using x_t = double;                                                                 \
      using d_t = double;                                                                 \
      __VA_ARGS__();                                                                      \
    } else {                                                                              \
      AT_DISPATCH_SWITCH(X_TYPE, NAME, GRASS_CASES_FP32_ACC([&] {                         \
        using x_t = scalar_t;                                                             \
        AT_DISPATCH_SWITCH(D_TYPE, NAME, GRASS_CASES_FP32_ACC([&] {                       \
          using d_t = scalar_t;                                                           \
          __VA_ARGS__();                                                                  \
        }));                                                                              \
      }));                                                                                \
    }                                                                                     \
  } while (0)
