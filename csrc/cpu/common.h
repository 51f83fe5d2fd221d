// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
//
// With AVX-512, `steps` also holds the gather as two-register permutes (gather_rows): output
// vector v (columns 16v .. 16v + 15) is assembled from the 32-value windows of the row that its
// columns lie in, one permute and one masked move per window. The capture's masks are sorted,
// so a vector's columns cluster in a few windows, and a 32-of-128 or 128-of-576 gather takes a
// few instructions per vector instead of three per value. Where the columns spread over more
// windows than that pays for (a few columns of a very wide row), `steps` stays empty and the
// scalar loop runs.
struct Columns {
  struct Step {
    int32_t window;           // the row's values [32 * window, 32 * window + 32)
    uint16_t lanes, lo, hi;   // output lanes it fills; loadable lanes of the window's halves
    int32_t perm[16];         // per output lane: the position within the window
  };
  std::vector<int64_t> idx, ones;
  std::vector<Step> steps;    // by output vector, in order
  std::vector<int64_t> ends;  // ends[v]: one past output vector v's last step
  Columns(const int64_t* raw, int64_t n, int64_t width) : idx(raw, raw + n) {
    for (int64_t i = 0; i < n; ++i) {
      if (idx[i] == width) {
        ones.push_back(i);
        idx[i] = 0;
      }
    }
#if defined(__AVX512F__)
    plan(width);
#endif
  }

 private:
  void plan(int64_t width) {
    const int64_t n = static_cast<int64_t>(idx.size());
    std::vector<bool> one(n, false);
    for (int64_t p : ones) one[p] = true;
    auto valid = [&](int64_t start) {  // lanes of [start, start + 16) inside the row
      const int64_t c = std::clamp<int64_t>(width - start, 0, 16);
      return static_cast<uint16_t>(c == 16 ? 0xFFFF : (1u << c) - 1);
    };
    for (int64_t v = 0; v * 16 < n; ++v) {
      const size_t first = steps.size();
      for (int64_t j = 0; j < 16 && v * 16 + j < n; ++j) {
        const int64_t i = v * 16 + j;
        if (one[i]) continue;  // written as 1 after the vector
        const auto w = static_cast<int32_t>(idx[i] / 32);
        if (steps.size() == first || steps.back().window != w) {  // sorted: windows ascend
          if (steps.size() > first && steps.back().window > w) {  // unsorted: scalar loop
            steps.clear();
            ends.clear();
            return;
          }
          steps.push_back(Step{w, 0, valid(32 * int64_t{w}), valid(32 * int64_t{w} + 16), {}});
        }
        steps.back().lanes |= static_cast<uint16_t>(1u << j);
        steps.back().perm[j] = static_cast<int32_t>(idx[i] % 32);
      }
      ends.push_back(static_cast<int64_t>(steps.size()));
    }
    // ~4 instructions per step against ~3 per value of the scalar loop; keep a margin.
    if (4 * static_cast<int64_t>(steps.size()) + 2 * static_cast<int64_t>(ends.size()) > 2 * n) {
      steps.clear();
      ends.clear();
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
#if defined(__AVX512F__)
// R rows at a time: each permute waits on the one before it in the same output vector, so rows
// are interleaved to keep the permute unit busy (one row at a time ran at a third of the rate).
template <int R>
inline void permute_rows(const float* x, int64_t ldx, const Columns& cols, float* out,
                         int64_t ldo, __mmask16 tail) {
  const int64_t nv = static_cast<int64_t>(cols.ends.size());
  int64_t s = 0;
  for (int64_t v = 0; v < nv; ++v) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (; s < cols.ends[v]; ++s) {
      const Columns::Step& st = cols.steps[s];
      const __m512i perm = _mm512_loadu_si512(st.perm);
      const float* w = x + 32 * int64_t{st.window};
      for (int r = 0; r < R; ++r) {
        const __m512 lo = _mm512_maskz_loadu_ps(st.lo, w + r * ldx);  // masked lanes: no fault
        const __m512 hi = _mm512_maskz_loadu_ps(st.hi, w + r * ldx + 16);
        acc[r] = _mm512_mask_mov_ps(acc[r], st.lanes, _mm512_permutex2var_ps(lo, perm, hi));
      }
    }
    const __mmask16 keep = v + 1 == nv ? tail : __mmask16{0xFFFF};
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo + 16 * v, keep, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t p : cols.ones) out[r * ldo + p] = 1.0f;
  }
}

inline void gather_rows_permute(const float* x, int64_t ldx, int64_t rows, const Columns& cols,
                                float* out, int64_t ldo) {
  const int64_t n = static_cast<int64_t>(cols.idx.size());
  const auto tail = static_cast<__mmask16>(n % 16 ? (1u << (n % 16)) - 1 : 0xFFFF);
  constexpr int kRows = 8;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    permute_rows<kRows>(x + r * ldx, ldx, cols, out + r * ldo, ldo, tail);
  }
  for (; r < rows; ++r) permute_rows<1>(x + r * ldx, ldx, cols, out + r * ldo, ldo, tail);
}
#endif

template <typename scalar_t, typename acc_t>
GRASS_SCALAR_LOOP void gather_rows(const scalar_t* __restrict__ x, int64_t ldx, int64_t rows,
                                   const Columns& cols, acc_t* __restrict__ out, int64_t ldo) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (!cols.ends.empty()) {
      gather_rows_permute(x, ldx, rows, cols, out, ldo);
      return;
    }
  }
#endif
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
