// The capture's per-layer hooks in C++, for plain contiguous CPU tensors in per-example mode
// (grass_llm/capture/native.py). One CaptureHook per FactGraSS layer is the module's forward
// hook: it gathers the kept input columns and registers a C++ hook on the output (made a leaf
// first where nothing upstream requires grad), which, when autograd produces delta, runs the
// fused kernel and keeps the [B, K] result for Python to take after backward. No Python runs
// per layer and step, and the backward hook needs no GIL.
//
// Anything else (a tensor subclass such as DTensor, a non-contiguous or non-3-D activation, a
// call the gather refuses) goes to the Python hook given as `fallback`, unchanged. An output
// gradient the kernel refuses is kept, with its features, for Python to reduce through the
// checked path after backward, which computes the same result or raises the precise error.
#include <torch/extension.h>

#include <memory>
#include <string>

#include "../grass_kernels.h"

namespace grass {
namespace {

struct LayerState {
  std::string name;
  at::Tensor feats;         // the kept input columns, from forward until delta arrives
  at::Tensor result;        // [B, K], until taken
  at::Tensor pending_feats; // a call the kernel refused: reduced by Python after backward
  at::Tensor pending_grad;
};

class CaptureHook {
 public:
  // idx_in gathers x's kept columns; feat_idx .. sgn are the kernel's tables for the gathered
  // features (FactGraSSCall.tables: feat_idx reads every feature column in order).
  CaptureHook(std::string name, at::Tensor idx_in, at::Tensor feat_idx, at::Tensor idx_out,
              at::Tensor indptr, at::Tensor src, at::Tensor sgn, double scale,
              py::object tensor_type, py::object fallback)
      : idx_in_(std::move(idx_in)), feat_idx_(std::move(feat_idx)), idx_out_(std::move(idx_out)),
        indptr_(std::move(indptr)), src_(std::move(src)), sgn_(std::move(sgn)), scale_(scale),
        tensor_type_(std::move(tensor_type)), fallback_(std::move(fallback)),
        state_(std::make_shared<LayerState>()) {
    state_->name = std::move(name);
  }

  // The forward hook: (module, args, output) -> None.
  py::object call(const py::object& module, const py::tuple& args, const py::object& output) {
    if (!at::GradMode::is_enabled()) return py::none();
    if (args.size() < 1 || !exact_tensor(args[0]) || !exact_tensor(output)) {
      return fallback_(module, args, output);
    }
    at::Tensor x = py::reinterpret_borrow<py::object>(args[0]).cast<at::Tensor>();
    if (!x.is_cpu() || x.dim() != 3 || !x.is_contiguous()) return fallback_(module, args, output);
    at::Tensor out = output.cast<at::Tensor>();
    // Nothing upstream requires grad: this layer is among the first hooked ones, and its output
    // becomes the leaf where backward stops (GradientCapture: the module's output is replaced
    // by a leaf with the same values, so no graph below it is built or run).
    py::object leaf = py::none();
    if (!out.requires_grad()) {
      out = out.detach();
      out.set_requires_grad(true);
      leaf = py::cast(out);
    }
    at::Tensor feats;
    bool refused = false;
    {
      py::gil_scoped_release no_gil;  // the gather touches no Python object
      try {
        feats = gather_columns(x, idx_in_);
      } catch (const c10::Error&) {
        refused = true;
      }
    }
    if (refused) {  // the Python hook says precisely what is wrong
      if (leaf.is_none()) return fallback_(module, args, output);
      fallback_(module, args, leaf);  // it takes the leaf as it is
      return leaf;
    }
    state_->feats = std::move(feats);  // a recomputation overwrites it with identical values
    out.register_hook([st = state_, tables = tables()](const at::Tensor& grad) {
      on_grad(*st, grad, tables);
    });
    return leaf;  // None keeps the module's output; a leaf replaces it
  }

  // (result, feats, grad) of this step, then cleared: a result, or the features and gradient
  // of a call the kernel refused, or all None when no gradient reached the layer.
  py::tuple take() {
    LayerState& s = *state_;
    py::tuple got = py::make_tuple(as_object(s.result), as_object(s.pending_feats),
                                   as_object(s.pending_grad));
    reset();
    return got;
  }

  void reset() {
    LayerState& s = *state_;
    s.feats = s.result = s.pending_feats = s.pending_grad = at::Tensor();
  }

 private:
  struct Tables {
    at::Tensor feat_idx, idx_out, indptr, src, sgn;
    double scale;
  };

  Tables tables() const { return {feat_idx_, idx_out_, indptr_, src_, sgn_, scale_}; }

  static void on_grad(LayerState& s, const at::Tensor& grad, const Tables& t) {
    TORCH_CHECK(s.feats.defined(), "layer ", s.name, ": output gradient without stored inputs "
                "(is the layer called twice in one forward?)");
    TORCH_CHECK(!s.result.defined() && !s.pending_grad.defined(), "layer ", s.name,
                " received two output gradients in one step; modules called more than once "
                "per forward are not supported");
    at::Tensor feats = std::move(s.feats);
    s.feats = at::Tensor();
    if (grad.dim() == 3 && grad.is_contiguous()) {
      try {
        s.result = factgrass(feats, grad, t.feat_idx, t.idx_out, t.indptr, t.src, t.sgn,
                             t.scale, false);
        return;
      } catch (const c10::Error&) {
        // falls through: Python reduces it through the checked path
      }
    }
    s.pending_feats = std::move(feats);
    s.pending_grad = grad;
  }

  bool exact_tensor(const py::handle& obj) const {
    return reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())) == tensor_type_.ptr();
  }

  static py::object as_object(const at::Tensor& t) {
    return t.defined() ? py::cast(t) : py::none();
  }

  at::Tensor idx_in_, feat_idx_, idx_out_, indptr_, src_, sgn_;
  double scale_;
  py::object tensor_type_, fallback_;
  std::shared_ptr<LayerState> state_;
};

}  // namespace

void bind_capture_hook(py::module_& m) {
  py::class_<CaptureHook>(m, "CaptureHook",
                          "A FactGraSS layer's capture hooks in C++ (grass_llm/capture/native.py)")
      .def(py::init<std::string, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, double, py::object, py::object>(),
           py::arg("name"), py::arg("idx_in"), py::arg("feat_idx"), py::arg("idx_out"),
           py::arg("indptr"),
           py::arg("src"), py::arg("sgn"), py::arg("scale"), py::arg("tensor_type"),
           py::arg("fallback"))
      .def("__call__", &CaptureHook::call, py::arg("module"), py::arg("args"), py::arg("output"))
      .def("take", &CaptureHook::take)
      .def("reset", &CaptureHook::reset);
}

}  // namespace grass
