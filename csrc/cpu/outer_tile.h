// The FactGraSS outer-product sum on the CPU: M[o, i] = sum_t d[t, idx_out[o]] * xs[t, i].
//
// A register-tiled loop (RO rows of M by CV vectors of columns held in registers while the
// tokens stream past), written with GCC/Clang vector types: 64-byte vectors, which the compiler
// maps onto AVX-512, AVX2 or NEON registers as the build's -march allows. For the small M of
// one layer and one example (32 x 32 to 128 x 128 over <= 256 tokens) this beats a BLAS call,
// whose set-up costs more than the multiply-adds themselves. The token loop runs in order, so
// each entry's sum has a fixed order: results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <cstring>

namespace grass {

template <typename acc_t>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(64)));
  // The same vector at any address of an acc_t: loads and stores by value. Copying through
  // memcpy took the accumulators' address, and GCC then kept all RO x CV of them on the stack,
  // loading and storing each around every multiply-add (~15 GFMA/s per core instead of ~40).
  typedef acc_t unaligned __attribute__((vector_size(64), aligned(alignof(acc_t))));
  static constexpr int lanes = 64 / sizeof(acc_t);
};

// Columns of xs rounded up to whole vectors: the padded columns must read as zeros.
template <typename acc_t>
inline int64_t padded_width(int64_t n) {
  constexpr int64_t L = VecOf<acc_t>::lanes;
  return (n + L - 1) / L * L;
}

// One RO x (CV * lanes) tile of M over tokens [0, Tn): xs rows of ldx (>= i0 + CV * lanes
// readable columns), d rows of ldd read at the RO columns cols[0..RO); rows r >= ro are computed
// on a repeated column and not stored.
template <typename acc_t, typename d_t, int RO, int CV>
inline void outer_tile(const acc_t* __restrict__ xs, int64_t ldx, const d_t* __restrict__ d,
                       int64_t ldd, const int64_t* cols, int64_t Tn, int64_t i0, int64_t ni,
                       int ro, acc_t* __restrict__ m, int64_t ldm) {
  using V = typename VecOf<acc_t>::type;
  using U = typename VecOf<acc_t>::unaligned;
  constexpr int L = VecOf<acc_t>::lanes;
  V acc[RO][CV];
  for (int r = 0; r < RO; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = V{} ;
  int64_t col[RO];
  for (int r = 0; r < RO; ++r) col[r] = cols[r < ro ? r : 0];
  for (int64_t t = 0; t < Tn; ++t) {
    const acc_t* xr = xs + t * ldx + i0;
    V xv[CV];
    for (int c = 0; c < CV; ++c) xv[c] = *reinterpret_cast<const U*>(xr + c * L);
    const d_t* dr = d + t * ldd;
    for (int r = 0; r < RO; ++r) {
      const acc_t dv = static_cast<acc_t>(dr[col[r]]);
      for (int c = 0; c < CV; ++c) acc[r][c] += dv * xv[c];
    }
  }
  for (int r = 0; r < ro; ++r) {
    acc_t row[CV * L];
    for (int c = 0; c < CV; ++c) *reinterpret_cast<U*>(row + c * L) = acc[r][c];
    std::memcpy(m + r * ldm + i0, row, sizeof(acc_t) * ni);
  }
}

// M [KO, KI] (row-major, overwritten) = sum over Tn tokens of d[t, idx_out[o]] * xs[t, i].
// xs must have padded_width(KI) readable columns per row (pad columns zero).
template <typename acc_t, typename d_t>
void outer_sum(const acc_t* xs, int64_t ldx, const d_t* d, int64_t ldd, const int64_t* idx_out,
               int64_t Tn, int64_t KO, int64_t KI, acc_t* m) {
  constexpr int64_t L = VecOf<acc_t>::lanes;
  int64_t i0 = 0;
  for (; i0 + 4 * L <= padded_width<acc_t>(KI); i0 += 4 * L) {
    const int64_t ni = std::min<int64_t>(4 * L, KI - i0);
    for (int64_t o = 0; o < KO; o += 4)
      outer_tile<acc_t, d_t, 4, 4>(xs, ldx, d, ldd, idx_out + o, Tn, i0, ni,
                                   static_cast<int>(std::min<int64_t>(4, KO - o)), m + o * KI, KI);
  }
  for (; i0 + 2 * L <= padded_width<acc_t>(KI); i0 += 2 * L) {
    const int64_t ni = std::min<int64_t>(2 * L, KI - i0);
    for (int64_t o = 0; o < KO; o += 8)
      outer_tile<acc_t, d_t, 8, 2>(xs, ldx, d, ldd, idx_out + o, Tn, i0, ni,
                                   static_cast<int>(std::min<int64_t>(8, KO - o)), m + o * KI, KI);
  }
  for (; i0 < KI; i0 += L) {
    const int64_t ni = std::min<int64_t>(L, KI - i0);
    for (int64_t o = 0; o < KO; o += 16)
      outer_tile<acc_t, d_t, 16, 1>(xs, ldx, d, ldd, idx_out + o, Tn, i0, ni,
                                    static_cast<int>(std::min<int64_t>(16, KO - o)), m + o * KI,
                                    KI);
  }
}

}  // namespace grass
