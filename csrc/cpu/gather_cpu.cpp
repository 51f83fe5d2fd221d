// The kept input columns of x on the CPU: [N rows, I] -> [N, KI] in the accumulation type, an
// index equal to I reading as 1 (the bias column). This is what the capture's forward hook keeps
// of each Linear's input, once per layer and step; parallel over blocks of rows.
#include "../grass_kernels.h"
#include "common.h"

namespace grass {
namespace {
// The gather is bound by reading x (a few random columns of every 64 bytes touch most cache
// lines), so what it costs scales with the values of x, N * I. x has just been written by the
// op before the layer, in parts by thread, so each thread reading one equal part of the rows
// also reads what is mostly in its own core's cache. At the tiny model's 16 x 128 rows of 128
// values, which ran on one thread before, that raised the capture from 0.92-0.94 of the floor to
// 0.94-0.95 (paired runs); below kParallelValues (256 KiB of float32) the caller does it alone.
constexpr int64_t kParallelValues = int64_t{1} << 16;
}  // namespace

at::Tensor gather_columns_cpu(const at::Tensor& x, const at::Tensor& idx) {
  const int64_t I = x.size(-1), KI = idx.numel(), N = x.numel() / std::max<int64_t>(I, 1);
  check_range(idx, I + 1, "idx", "[0, I] (I: the bias column)");
  auto sizes = x.sizes().vec();
  sizes.back() = KI;
  at::Tensor out = at::empty(sizes, x.options().dtype(acc_dtype(x)));
  const Columns cols(idx.data_ptr<int64_t>(), KI, I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    acc_t* out_p = out.data_ptr<acc_t>();
    const int64_t parts = N * I < kParallelValues ? 1 : at::get_num_threads();
    const int64_t grain = std::max<int64_t>(1, (N + parts - 1) / parts);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      gather_rows(x_p + begin * I, I, end - begin, cols, out_p + begin * KI, KI);
    });
  });
  return out;
}

}  // namespace grass
