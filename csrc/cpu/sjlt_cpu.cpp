// SJLT and its transpose on the CPU, parallel over (example, block of outputs).
// The forward map is a gather through the CSR of the transpose (common.h), so no two threads
// write the same output and results do not depend on the thread count.
#include "../grass_kernels.h"
#include "common.h"

namespace grass {
namespace {
constexpr int64_t kBlock = 512;  // outputs per task
}  // namespace

at::Tensor sjlt_cpu(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                    const at::Tensor& sgn, double scale) {
  const int64_t B = g.size(0), P = g.size(1), K = indptr.numel() - 1;
  check_csr_host(indptr, src, P, "P (columns of g)");
  at::Tensor out = at::empty({B, K}, g.options().dtype(acc_dtype(g)));
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sjlt_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* g_p = g.data_ptr<scalar_t>();
    acc_t* out_p = out.data_ptr<acc_t>();
    const int64_t* ip = indptr.data_ptr<int64_t>();
    const int64_t* sp = src.data_ptr<int64_t>();
    const float* sg = sgn.data_ptr<float>();
    const int64_t block_work = kBlock * (src.numel() / K + 1);
    at::parallel_for(0, B * blocks, grain_for(block_work), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, j0 = (task % blocks) * kBlock;
        csr_gather(g_p + b * P, ip, sp, sg, j0, std::min(K, j0 + kBlock),
                   static_cast<acc_t>(scale), out_p + b * K);
      }
    });
  });
  return out;
}

at::Tensor sjlt_t_cpu(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                      double scale) {
  const int64_t B = y.size(0), K = y.size(1), C = rows.size(0), P = rows.size(1);
  check_range(rows, K, "rows", "[0, K) (columns of y)");
  at::Tensor out = at::empty({B, P}, y.options().dtype(acc_dtype(y)));
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sjlt_t_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* y_p = y.data_ptr<scalar_t>();
    acc_t* out_p = out.data_ptr<acc_t>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    const float* sg = signs.data_ptr<float>();
    at::parallel_for(0, B * blocks, grain_for(kBlock * C), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, s0 = (task % blocks) * kBlock;
        const int64_t s1 = std::min(P, s0 + kBlock);
        const scalar_t* yb = y_p + b * K;
        for (int64_t s = s0; s < s1; ++s) {
          acc_t v = 0;
          for (int64_t r = 0; r < C; ++r) {
            v += static_cast<acc_t>(sg[r * P + s]) * static_cast<acc_t>(yb[rp[r * P + s]]);
          }
          out_p[b * P + s] = v * static_cast<acc_t>(scale);
        }
      }
    });
  });
  return out;
}

}  // namespace grass
