// csrc/cuda's kernels run on the CPU (emulate.h) against a plain float64 reference, in the
// launch sequence of factgrass_cuda.cu / sjlt_cuda.cu, once with the grids the launchers use
// and once with grids capped at 1-3 blocks per dimension, so that every grid-stride loop runs.
// Sizes are the production tiling's (k_in = 130, k_out = 67: several tiles, a partial last one)
// and odd token counts (partial chunks and row groups). Exit status 0 when every case passes.
//
// Build: c++ -std=c++20 -pthread [-fsanitize=...] check_kernels.cpp (tests/test_kernels.py).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "emulate.h"  // first: it defines what the kernels take from CUDA
#include "../../csrc/cuda/factgrass_kernels.cuh"
#include "../../csrc/cuda/sjlt_kernels.cuh"

using namespace grass::cuda_detail;  // NOLINT

namespace {

template <typename T>
std::vector<T> nan_buffer(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

struct Rng {  // splitmix64: the same inputs on every machine
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) / 9007199254740992.0 * 2 - 1; }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

struct Csr {  // an SJLT's transpose: c random signed rows per input position
  std::vector<int64_t> indptr, src;
  std::vector<float> sgn;
  int64_t K;
};

Csr make_csr(int64_t P, int64_t K, int c, Rng& rng) {
  std::vector<std::vector<std::pair<int64_t, float>>> rows(K);
  for (int r = 0; r < c; ++r)
    for (int64_t p = 0; p < P; ++p) {
      rows[rng.below(K)].push_back({p, rng.next() & 1 ? 1.f : -1.f});
    }
  Csr t{{0}, {}, {}, K};
  for (auto& row : rows) {
    for (auto [p, s] : row) t.src.push_back(p), t.sgn.push_back(s);
    t.indptr.push_back(static_cast<int64_t>(t.src.size()));
  }
  return t;
}

struct Case {
  int64_t B, T, I, O, KI, KO;
  std::vector<double> x, d;          // [B, T, I], [B, T, O]
  std::vector<int64_t> idx_in, idx_out;  // idx_in's last entry is I: the bias column
  Csr csr;
};

Case make_case(int64_t B, int64_t T, int64_t I, int64_t O, int64_t KI, int64_t KO, int64_t K,
               int c, uint64_t seed) {
  Rng rng{seed};
  Case k{B, T, I, O, KI, KO, {}, {}, {}, {}, {}};
  for (int64_t n = 0; n < B * T * I; ++n) k.x.push_back(rng.uniform());
  for (int64_t n = 0; n < B * T * O; ++n) k.d.push_back(rng.uniform());
  for (int64_t i = 0; i < KI - 1; ++i) k.idx_in.push_back((i * 7 + 3) % I);  // distinct: I % 7
  k.idx_in.push_back(I);
  for (int64_t o = 0; o < KO; ++o) k.idx_out.push_back((o * 5 + 1) % O);  // distinct: O % 5
  k.csr = make_csr(KI * KO, K, c, rng);
  return k;
}

// The spec (grass_llm/kernels/reference.py) in float64: [B, K] or [B * T, K].
std::vector<double> reference(const Case& k, double scale, bool per_token) {
  const int64_t KP = k.KI * k.KO, K = k.csr.K, R = per_token ? k.B * k.T : k.B;
  std::vector<double> m(R * KP, 0.0), out(R * K, 0.0);
  for (int64_t b = 0; b < k.B; ++b)
    for (int64_t t = 0; t < k.T; ++t) {
      const int64_t row = b * k.T + t, r = per_token ? row : b;
      for (int64_t o = 0; o < k.KO; ++o)
        for (int64_t i = 0; i < k.KI; ++i) {
          const int64_t col = k.idx_in[i];
          const double xv = col == k.I ? 1.0 : k.x[row * k.I + col];
          m[r * KP + o * k.KI + i] += k.d[row * k.O + k.idx_out[o]] * xv;
        }
    }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < K; ++j) {
      double s = 0;
      for (int64_t e = k.csr.indptr[j]; e < k.csr.indptr[j + 1]; ++e)
        s += k.csr.sgn[e] * m[r * KP + k.csr.src[e]];
      out[r * K + j] = s * scale;
    }
  return out;
}

unsigned capped(int64_t n, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, cap)));
}

// factgrass_cuda.cu's launch sequence on the emulator; cap_yz / cap_1d bound the grids.
template <typename acc_t>
std::vector<acc_t> run_factgrass(const Case& k, double scale, bool per_token, int64_t cap_yz,
                                 int64_t cap_1d, int rows_per_block) {
  const std::vector<acc_t> x(k.x.begin(), k.x.end()), d(k.d.begin(), k.d.end());
  const int64_t KP = k.KI * k.KO, K = k.csr.K, nnz = static_cast<int64_t>(k.csr.src.size());
  const acc_t sc = static_cast<acc_t>(scale);
  if (per_token) {
    const int64_t rows = k.B * k.T, F = k.KI + k.KO;
    auto feat = nan_buffer<acc_t>(rows * F);
    auto out = nan_buffer<acc_t>(rows * K);
    emu::launch(dim3{capped(ceil_div(rows * F, kThreads), cap_1d)}, kThreads, 0, false,
                gather_features_kernel<acc_t, acc_t, acc_t>, x.data(), d.data(),
                k.idx_in.data(), k.idx_out.data(), rows, k.I, k.O, k.KI, k.KO, feat.data());
    const int R = rows_per_block, pad = row_pad(R);
    std::vector<int2> pairs(std::max<int64_t>(nnz, 1), int2{-1, -1});
    emu::launch(dim3{capped(ceil_div(nnz, kThreads), cap_1d)}, kThreads, 0, false,
                csr_pairs_kernel, k.csr.src.data(), nnz, k.KI, pad, pairs.data());
    const dim3 grid{capped(ceil_div(rows, R), cap_1d)};
    const size_t smem = static_cast<size_t>(F) * pad * sizeof(acc_t);
    auto args = [&](auto kernel) {
      emu::launch(grid, kThreads, smem, true, kernel, feat.data(), rows, static_cast<int>(F),
                  k.csr.indptr.data(), static_cast<const int2*>(pairs.data()), k.csr.sgn.data(),
                  sc, K, out.data());
    };
    if (R == 16) args(per_token_kernel<16, acc_t>);
    else if (R == 4) args(per_token_kernel<4, acc_t>);
    else args(per_token_kernel<1, acc_t>);
    return out;
  }
  const int64_t tiles = ceil_div(k.KI, kTile) * ceil_div(k.KO, kTile);
  const int64_t S = ceil_div(k.T, kTokenChunk);
  auto part = nan_buffer<acc_t>(k.B * S * KP);
  emu::launch(dim3{static_cast<unsigned>(tiles), capped(S, cap_yz), capped(k.B, cap_yz)},
              kThreads, 0, true, masked_outer_kernel<acc_t, acc_t, acc_t>, x.data(), d.data(),
              k.idx_in.data(), k.idx_out.data(), k.B, k.T, k.I, k.O, k.KI, k.KO, S,
              part.data());
  auto m = part;
  if (S > 1) {
    m = nan_buffer<acc_t>(k.B * KP);
    emu::launch(dim3{capped(ceil_div(k.B * KP, kThreads), cap_1d)}, kThreads, 0, false,
                sum_chunks_kernel<acc_t>, static_cast<const acc_t*>(part.data()), k.B, S, KP,
                m.data());
  }
  auto out = nan_buffer<acc_t>(k.B * K);
  emu::launch(dim3{static_cast<unsigned>(ceil_div(K, kThreads)), capped(k.B, cap_yz)}, kThreads,
              0, false, csr_gather_kernel<acc_t, acc_t>, static_cast<const acc_t*>(m.data()),
              k.B, KP, k.csr.indptr.data(), k.csr.src.data(), k.csr.sgn.data(), sc, K,
              out.data());
  return out;
}

int failures = 0;

template <typename got_t>
void expect_close(const char* what, const std::vector<got_t>& got,
                  const std::vector<double>& want, double rtol) {
  double scale = 0, err = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  bool finite = got.size() == want.size();
  for (size_t n = 0; finite && n < got.size(); ++n) {
    finite = std::isfinite(static_cast<double>(got[n]));
    err = std::max(err, std::abs(static_cast<double>(got[n]) - want[n]));
  }
  const bool ok = finite && err <= rtol * scale;
  failures += !ok;
  std::printf("%s  %-58s max err %.3g of %.3g%s\n", ok ? "ok  " : "FAIL", what, err, scale,
              finite ? "" : " (NaN, or an output never written)");
}

void check_sjlt(int64_t cap) {
  Rng rng{11};
  const int64_t B = 5, P = 300, K = 37;
  const Csr t = make_csr(P, K, 3, rng);
  std::vector<float> g(B * P), y(B * K);
  for (auto& v : g) v = static_cast<float>(rng.uniform());
  for (auto& v : y) v = static_cast<float>(rng.uniform());
  // the forward map: device.cuh's CSR gather, as sjlt_cuda launches it
  auto out = nan_buffer<float>(B * K);
  emu::launch(dim3{static_cast<unsigned>(ceil_div(K, kThreads)), capped(B, cap)}, kThreads, 0,
              false, csr_gather_kernel<float, float>, static_cast<const float*>(g.data()), B, P,
              t.indptr.data(), t.src.data(), t.sgn.data(), 0.5f, K, out.data());
  std::vector<double> want(B * K, 0.0), want_t(B * P, 0.0);
  // the transpose from the [c, P] row table: row r of position p is its r-th CSR entry
  const int C = 3;
  std::vector<int64_t> rows(C * P);
  std::vector<float> signs(C * P);
  std::vector<int> seen(P, 0);
  for (int64_t j = 0; j < K; ++j)
    for (int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) {
      const int64_t p = t.src[e];
      rows[seen[p] * P + p] = j, signs[seen[p] * P + p] = t.sgn[e], ++seen[p];
      for (int64_t b = 0; b < B; ++b) {
        want[b * K + j] += 0.5 * t.sgn[e] * g[b * P + p];
        want_t[b * P + p] += 0.5 * t.sgn[e] * y[b * K + j];
      }
    }
  auto out_t = nan_buffer<float>(B * P);
  emu::launch(dim3{static_cast<unsigned>(ceil_div(P, kThreads)), capped(B, cap)}, kThreads, 0,
              false, sjlt_t_kernel<float, float>, static_cast<const float*>(y.data()),
              static_cast<const int64_t*>(rows.data()), static_cast<const float*>(signs.data()),
              B, static_cast<int64_t>(C), P, K, 0.5f, out_t.data());
  char what[96];
  std::snprintf(what, sizeof what, "sjlt, B=%lld, grid y cap %lld", (long long)B, (long long)cap);
  expect_close(what, out, want, 1e-5);
  std::snprintf(what, sizeof what, "sjlt_t, B=%lld, grid y cap %lld", (long long)B, (long long)cap);
  expect_close(what, out_t, want_t, 1e-5);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // for ThreadSanitizer
  // float32 sums of up to ~300 terms in another order than float64's: 1e-5 of the largest entry
  const double rtol32 = 1e-5, rtol64 = 1e-12;
  const int64_t full = 65536;
  for (int64_t cap : {full, int64_t{1}}) check_sjlt(cap);
  // per example: production tiling, T = 150 (three 64-token chunks, the last partial), bias
  const Case prod = make_case(2, quick ? 70 : 150, 301, 257, 130, 67, 211, 2, 1);
  const auto want = reference(prod, 0.5, false);
  for (auto [cap_yz, cap_1d] : {std::pair<int64_t, int64_t>{full, full}, {1, 3}}) {
    char what[96];
    std::snprintf(what, sizeof what, "per example, 130x67, T=%lld, grid caps %lld/%lld",
                  (long long)prod.T, (long long)cap_yz, (long long)cap_1d);
    expect_close(what, run_factgrass<float>(prod, 0.5, false, cap_yz, cap_1d, 16), want, rtol32);
  }
  expect_close("per example, float64", run_factgrass<double>(prod, 0.5, false, full,
               full, 16), want, rtol64);
  // per token: every rows-per-block choice, 37 rows (partial last group), capped grids
  const Case tok = make_case(1, 37, 301, 257, 130, 67, 211, 2, 2);
  const auto want_tok = reference(tok, 0.5, true);
  for (int R : {16, 4, 1}) {
    for (int64_t cap : {full, int64_t{2}}) {
      if (quick && cap == full) continue;
      char what[96];
      std::snprintf(what, sizeof what, "per token, 130x67, %d rows per block, grid cap %lld", R,
                    (long long)cap);
      expect_close(what, run_factgrass<float>(tok, 0.5, true, full, cap, R), want_tok, rtol32);
    }
  }
  expect_close("per token, float64, 16 rows per block", run_factgrass<double>(
               tok, 0.5, true, full, full, 16), want_tok, rtol64);
  // T = 1, one tile, a single chunk: no chunk sum
  const Case one = make_case(3, 1, 29, 23, 7, 5, 17, 2, 3);
  expect_close("per example, 7x5, T=1", run_factgrass<float>(one, 1.0, false, full, full, 16),
               reference(one, 1.0, false), rtol32);
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
