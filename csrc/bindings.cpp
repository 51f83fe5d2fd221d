// Python bindings: input checks, then dispatch by device to the CPU or CUDA kernels.
// Every entry point validates device, dtype, shape and contiguity here, so the kernels may
// assume well-formed inputs.
#include <torch/extension.h>

#include "grass_kernels.h"

namespace grass {
namespace {

bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ",
              ref.device());
}

void check_index(const at::Tensor& ref, const at::Tensor& t, const char* name, int64_t dim) {
  check_same_device(ref, t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The CSR of an SJLT's transpose: indptr [K+1], src [nnz], sgn [nnz] float32.
void check_csr(const at::Tensor& ref, const at::Tensor& indptr, const at::Tensor& src,
               const at::Tensor& sgn) {
  check_index(ref, indptr, "indptr", 1);
  check_index(ref, src, "src", 1);
  check_same_device(ref, sgn, "sgn");
  TORCH_CHECK(sgn.scalar_type() == at::kFloat, "sgn must be float32, got ", sgn.scalar_type());
  TORCH_CHECK(sgn.is_contiguous() && sgn.dim() == 1, "sgn must be a contiguous 1-D tensor");
  TORCH_CHECK(indptr.numel() >= 2, "indptr must have K+1 >= 2 entries");
  TORCH_CHECK(src.numel() == sgn.numel(), "src and sgn must have the same length, got ",
              src.numel(), " and ", sgn.numel());
}

void check_data(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(is_float(t), name, " must be float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.size(0) > 0, name, ": empty batch (B = 0)");
}

}  // namespace

at::Tensor factgrass(const at::Tensor& x, const at::Tensor& d, const at::Tensor& idx_in,
                     const at::Tensor& idx_out, const at::Tensor& indptr, const at::Tensor& src,
                     const at::Tensor& sgn, double scale, bool per_token) {
  check_data(x, "x", 3);
  check_data(d, "delta", 3);
  check_same_device(x, d, "delta");
  TORCH_CHECK((x.scalar_type() == at::kDouble) == (d.scalar_type() == at::kDouble),
              "x and delta must be both float64 or both not, got ", x.scalar_type(), " and ",
              d.scalar_type());
  TORCH_CHECK(x.size(0) == d.size(0) && x.size(1) == d.size(1),
              "x and delta disagree on [B, T]: ", x.sizes(), " vs ", d.sizes());
  TORCH_CHECK(x.size(1) > 0, "x has no tokens (T = 0)");
  check_index(x, idx_in, "idx_in", 1);
  check_index(x, idx_out, "idx_out", 1);
  TORCH_CHECK(idx_in.numel() > 0 && idx_out.numel() > 0, "idx_in and idx_out must be non-empty");
  check_csr(x, indptr, src, sgn);
  if (x.is_cuda()) {
#ifdef GRASS_WITH_CUDA
    return factgrass_cuda(x, d, idx_in, idx_out, indptr, src, sgn, scale, per_token);
#else
    TORCH_CHECK(false, "this build of the grass_llm kernels has no CUDA support");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "unsupported device ", x.device());
  return factgrass_cpu(x, d, idx_in, idx_out, indptr, src, sgn, scale, per_token);
}

at::Tensor gather_columns(const at::Tensor& x, const at::Tensor& idx) {
  TORCH_CHECK(is_float(x), "x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be a contiguous tensor of >= 1 dims");
  check_index(x, idx, "idx", 1);
  TORCH_CHECK(x.is_cpu(), "gather_columns runs on the CPU only (CUDA tensors use torch's "
              "index_select), got ", x.device());
  return gather_columns_cpu(x, idx);
}

at::Tensor sjlt(const at::Tensor& g, const at::Tensor& indptr, const at::Tensor& src,
                const at::Tensor& sgn, double scale) {
  check_data(g, "g", 2);
  check_csr(g, indptr, src, sgn);
  if (g.is_cuda()) {
#ifdef GRASS_WITH_CUDA
    return sjlt_cuda(g, indptr, src, sgn, scale);
#else
    TORCH_CHECK(false, "this build of the grass_llm kernels has no CUDA support");
#endif
  }
  TORCH_CHECK(g.is_cpu(), "unsupported device ", g.device());
  return sjlt_cpu(g, indptr, src, sgn, scale);
}

at::Tensor sjlt_t(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& signs,
                  double scale) {
  check_data(y, "y", 2);
  check_index(y, rows, "rows", 2);
  check_same_device(y, signs, "signs");
  TORCH_CHECK(signs.scalar_type() == at::kFloat && signs.is_contiguous(),
              "signs must be contiguous float32");
  TORCH_CHECK(signs.sizes() == rows.sizes(), "rows and signs must have the same shape [c, P], "
              "got ", rows.sizes(), " and ", signs.sizes());
  if (y.is_cuda()) {
#ifdef GRASS_WITH_CUDA
    return sjlt_t_cuda(y, rows, signs, scale);
#else
    TORCH_CHECK(false, "this build of the grass_llm kernels has no CUDA support");
#endif
  }
  TORCH_CHECK(y.is_cpu(), "unsupported device ", y.device());
  return sjlt_t_cpu(y, rows, signs, scale);
}

void bind_capture_hook(py::module_& m);  // cpu/capture_hook.cpp

}  // namespace grass

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grass_llm fused kernels: FactGraSS and SJLT (CPU/OpenMP and CUDA)";
  m.def("factgrass", &grass::factgrass, "FactGraSS: masked outer-product sum, then SJLT",
        py::arg("x"), py::arg("delta"), py::arg("idx_in"), py::arg("idx_out"),
        py::arg("indptr"), py::arg("src"), py::arg("sgn"), py::arg("scale"),
        py::arg("per_token"));
  m.def("gather_columns", &grass::gather_columns,
        "the kept columns of x in the accumulation type, index I reading as 1",
        py::arg("x"), py::arg("idx"));
  m.def("sjlt", &grass::sjlt, "SJLT of a batch of vectors", py::arg("g"), py::arg("indptr"),
        py::arg("src"), py::arg("sgn"), py::arg("scale"));
  m.def("sjlt_t", &grass::sjlt_t, "transpose SJLT of a batch of vectors", py::arg("y"),
        py::arg("rows"), py::arg("signs"), py::arg("scale"));
  grass::bind_capture_hook(m);
#ifdef GRASS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
