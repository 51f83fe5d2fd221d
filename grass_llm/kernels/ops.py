"""The kernels as torch custom ops, dispatched to the CUDA or CPU extension or the reference.

Each op is a ``torch.library.custom_op`` with a ``register_fake`` (so it traces under
``torch.compile`` and meta tensors). Its implementation checks the inputs (the same checks
whichever backend runs, raising ValueError): shapes, dtypes and devices on every call, and the
index ranges of the tables against the call's sizes through ``tables`` (measured once per
table, then cached), so no kernel ever reads out of bounds. It then calls the extension when it
is loaded and built for the tensor's device, and ``reference`` otherwise.

A kernel that fails to *launch* (a GPU the build has no code for: "no kernel image is
available", an unsupported PTX version, too many resources) falls back to ``reference`` with one
warning in ``auto`` mode, and the device is not tried again in this process;
``GRASS_LLM_KERNELS=extension`` raises instead. Shapes: see ``reference``.

The capture's hooks call each layer's kernel through ``FactGraSSCall`` (tables checked once
for the layer, then only the call's shapes and dtypes) and gather the forward hook's columns
with ``host_gather`` on the CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from grass_llm.kernels import build, reference, tables

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned_devices: set[str] = set()
# What a launch failure says (c10's CUDA error text): the kernel never ran, the context is fine.
LAUNCH_ERRORS = ("no kernel image is available", "invalid device function",
                 "unsupported PTX version", "PTX was compiled with an unsupported toolchain",
                 "device kernel image is invalid", "too many resources requested",
                 "invalid configuration argument", "named symbol not found")


def _backend(t: Tensor):
    """The extension if it can run on ``t``'s device, else None (the reference)."""
    ext = build.extension()
    if ext is None or t.device.type not in ("cpu", "cuda"):
        return None
    if str(t.device) in build.launch_failures():
        return None
    if t.is_cuda and not ext.with_cuda:
        if "cuda" not in _warned_devices:
            _warned_devices.add("cuda")
            warnings.warn("grass_llm: the kernels were built without CUDA (no toolkit found "
                          "at build time); CUDA tensors use the pure-torch reference",
                          RuntimeWarning, stacklevel=3)
        return None
    return ext


def _run(kernel, fallback, device: torch.device):
    """``kernel()``; on a launch failure, warn once, stop using the extension on ``device`` and
    return ``fallback()`` (``auto`` mode) or raise (``extension`` mode)."""
    try:
        return kernel()
    except RuntimeError as exc:
        return _launch_failed(exc, fallback, device)


def _launch_failed(exc: RuntimeError, fallback, device: torch.device):
    """What ``_run`` does with a kernel's RuntimeError: re-raise anything but a launch failure."""
    text = str(exc)
    if not any(m in text for m in LAUNCH_ERRORS):
        raise exc
    if build.mode() == "extension":
        raise RuntimeError(f"GRASS_LLM_KERNELS=extension but the grass_llm kernels failed "
                           f"to launch on {device}: {text.strip()[:500]}") from exc
    build.record_launch_failure(device, text)
    warnings.warn(f"grass_llm: the fused kernels could not launch on {device}, using the "
                  f"pure-torch reference there instead ({text.strip()[:300]}); "
                  "`python -m grass_llm.kernels info` shows the build's GPU targets",
                  RuntimeWarning, stacklevel=5)
    return fallback()


def backend_name(t: Tensor) -> str:
    """``"cuda"``, ``"cpu"`` or ``"reference"``: what an op on ``t`` would run."""
    ext = _backend(t)
    return "reference" if ext is None else t.device.type


def _check_data(t: Tensor, name: str, dim: int) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {list(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0)")


def _check_index(t: Tensor, name: str, dim: int, like: Tensor) -> None:
    if t.dtype != torch.int64 or t.dim() != dim or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dim}-D int64 tensor, got {t.dtype} "
                         f"{list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {like.device}")


def _check_csr(indptr: Tensor, src: Tensor, sgn: Tensor, like: Tensor, width: int,
               what: str) -> None:
    _check_index(indptr, "indptr", 1, like)
    _check_index(src, "src", 1, like)
    if sgn.dtype != torch.float32 or sgn.shape != src.shape:
        raise ValueError("sgn must be float32 with the shape of src")
    if sgn.device != like.device:
        raise ValueError(f"sgn is on {sgn.device} but the data is on {like.device}")
    if indptr.numel() < 2:
        raise ValueError("indptr must have K+1 >= 2 entries")
    tables.check_csr(indptr, src, width, what)


def _check_factgrass_tables(idx_in: Tensor, idx_out: Tensor, indptr: Tensor, src: Tensor,
                            sgn: Tensor, like: Tensor, I: int, O: int) -> None:
    """The tables of a FactGraSS call on ``[.., I]`` x and ``[.., O]`` delta on ``like``'s
    device: types, devices and every index in range."""
    _check_index(idx_in, "idx_in", 1, like)
    _check_index(idx_out, "idx_out", 1, like)
    if idx_in.numel() == 0 or idx_out.numel() == 0:
        raise ValueError("idx_in and idx_out must be non-empty")
    tables.check_range(idx_in, "idx_in", I + 1, f"columns of x, {I} meaning the bias")
    tables.check_range(idx_out, "idx_out", O, "columns of delta")
    _check_csr(indptr, src, sgn, like, idx_in.numel() * idx_out.numel(), "positions of the "
               "masked k_out x k_in outer product")


@torch.library.custom_op("grass_llm::factgrass", mutates_args=())
def factgrass(x: Tensor, delta: Tensor, idx_in: Tensor, idx_out: Tensor, indptr: Tensor,
              src: Tensor, sgn: Tensor, scale: float, per_token: bool) -> Tensor:
    """FactGraSS ``[B, T, I] x [B, T, O] -> [B, K]`` (or ``[B, T, K]`` with ``per_token``)."""
    _check_data(x, "x", 3)
    _check_data(delta, "delta", 3)
    if x.shape[:2] != delta.shape[:2]:
        raise ValueError(f"x and delta disagree on [B, T]: {list(x.shape[:2])} vs "
                         f"{list(delta.shape[:2])}")
    if x.shape[1] == 0:
        raise ValueError("x has no tokens (T = 0)")
    if (x.dtype == torch.float64) != (delta.dtype == torch.float64):
        raise ValueError(f"x and delta must be both float64 or both not, got {x.dtype} and "
                         f"{delta.dtype}")
    if delta.device != x.device:
        raise ValueError(f"delta is on {delta.device} but x is on {x.device}")
    _check_factgrass_tables(idx_in, idx_out, indptr, src, sgn, x, x.shape[2], delta.shape[2])

    def slow():
        return reference.factgrass(x, delta, idx_in, idx_out, indptr, src, sgn, scale,
                                   per_token)

    ext = _backend(x)
    if ext is None:
        return slow()
    return _run(lambda: ext.factgrass(x.contiguous(), delta.contiguous(), idx_in, idx_out,
                                      indptr, src, sgn, scale, per_token), slow, x.device)


@factgrass.register_fake
def _(x, delta, idx_in, idx_out, indptr, src, sgn, scale, per_token):
    shape = (*x.shape[:2], indptr.shape[0] - 1) if per_token else (x.shape[0],
                                                                    indptr.shape[0] - 1)
    return x.new_empty(shape, dtype=reference.acc_dtype(x))


@torch.library.custom_op("grass_llm::sjlt", mutates_args=())
def sjlt(g: Tensor, indptr: Tensor, src: Tensor, sgn: Tensor, scale: float) -> Tensor:
    """SJLT of a batch of vectors ``[B, P] -> [B, K]``."""
    _check_data(g, "g", 2)
    _check_csr(indptr, src, sgn, g, g.shape[1], "coordinates of g")

    def slow():
        return reference.sjlt(g, indptr, src, sgn, scale)

    ext = _backend(g)
    if ext is None:
        return slow()
    return _run(lambda: ext.sjlt(g.contiguous(), indptr, src, sgn, scale), slow, g.device)


@sjlt.register_fake
def _(g, indptr, src, sgn, scale):
    return g.new_empty((g.shape[0], indptr.shape[0] - 1), dtype=reference.acc_dtype(g))


@torch.library.custom_op("grass_llm::sjlt_t", mutates_args=())
def sjlt_t(y: Tensor, rows: Tensor, signs: Tensor, scale: float) -> Tensor:
    """Transpose SJLT ``[B, K] -> [B, P]`` from the ``[C, P]`` row and sign tables."""
    _check_data(y, "y", 2)
    _check_index(rows, "rows", 2, y)
    if signs.dtype != torch.float32 or signs.shape != rows.shape:
        raise ValueError("signs must be float32 with the shape of rows [C, P]")
    if signs.device != y.device:
        raise ValueError(f"signs is on {signs.device} but y is on {y.device}")
    if rows.shape[0] == 0:
        raise ValueError("rows must have C >= 1 rows (nonzeros per coordinate)")
    tables.check_range(rows, "rows", y.shape[1], "outputs of the SJLT, columns of y")

    def slow():
        return reference.sjlt_t(y, rows, signs, scale)

    ext = _backend(y)
    if ext is None:
        return slow()
    return _run(lambda: ext.sjlt_t(y.contiguous(), rows, signs, scale), slow, y.device)


@sjlt_t.register_fake
def _(y, rows, signs, scale):
    return y.new_empty((y.shape[0], rows.shape[1]), dtype=reference.acc_dtype(y))


def host_gather(x: Tensor, idx: Tensor) -> Tensor | None:
    """``x[..., idx]`` in the accumulation dtype (an index equal to ``I`` reads as 1) through
    the CPU extension, or None where that does not run (a CUDA tensor, no extension, under
    ``torch.compile``): the caller then gathers with torch. The extension checks ``idx``'s
    range itself (a plain loop over a few hundred entries)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    ext = _backend(x)
    return None if ext is None else ext.gather_columns(x.contiguous(), idx)


class FactGraSSCall:
    """``factgrass`` with its tables and widths fixed and checked once: one layer's call in the
    capture hooks, made on every step.

    The op's own checks (and torch's custom-op dispatch) cost more than the kernel itself on a
    small layer; here the tables are validated for ``[.., I]`` x and ``[.., O]`` delta when the
    call is built, and each call only checks what can change: dimensions, widths, batch and
    token counts, dtypes, devices and the tables' version counters (an in-place edit). Any call
    that fails those checks, and any call under ``torch.compile``, goes through the op, which
    raises its precise error (or traces).
    """

    def __init__(self, idx_in: Tensor, idx_out: Tensor, indptr: Tensor, src: Tensor,
                 sgn: Tensor, scale: float, I: int, O: int):
        _check_factgrass_tables(idx_in, idx_out, indptr, src, sgn, idx_in, I, O)
        self.tables = (idx_in, idx_out, indptr, src, sgn)
        self._versions = self._table_versions()
        self.scale, self.I, self.O, self.device = float(scale), int(I), int(O), idx_in.device
        self._device_name, self._cuda = str(self.device), self.device.type == "cuda"
        self._fused = self.device.type in ("cpu", "cuda")  # elsewhere: the op's reference

    def _table_versions(self) -> tuple:
        return tuple(tables.version(t) for t in self.tables)

    def _plain(self, x: Tensor, delta: Tensor) -> bool:
        # A table edited in place since it was checked goes through the op, which checks it
        # again (tables.py keys its cache by the version counter too).
        return (x.dim() == 3 and delta.dim() == 3 and x.shape[2] == self.I
                and delta.shape[2] == self.O and x.shape[0] == delta.shape[0] > 0
                and x.shape[1] == delta.shape[1] > 0 and x.device == self.device
                and delta.device == self.device and x.dtype in _FLOATS
                and delta.dtype in _FLOATS
                and (x.dtype == torch.float64) == (delta.dtype == torch.float64)
                and not torch.compiler.is_compiling()
                and self._table_versions() == self._versions)

    def __call__(self, x: Tensor, delta: Tensor, per_token: bool) -> Tensor:
        if not self._plain(x, delta):
            return factgrass(x, delta, *self.tables, self.scale, per_token)
        ext = build.extension()
        if (ext is None or not self._fused or self._device_name in build.launch_failures()
                or (self._cuda and not ext.with_cuda)):
            return factgrass(x, delta, *self.tables, self.scale, per_token)  # the reference
        try:
            return ext.factgrass(x.contiguous(), delta.contiguous(), *self.tables, self.scale,
                                 per_token)
        except RuntimeError as exc:
            return _launch_failed(exc, lambda: reference.factgrass(
                x, delta, *self.tables, self.scale, per_token), x.device)


def host_calls(idx_in: Tensor, call: FactGraSSCall):
    """A factorized layer's two capture calls bound straight to the CPU extension, or None
    where that does not run (no extension, tables not on the CPU).

    Returns ``(gather, reduce)``: ``gather(x)`` is ``host_gather(x, idx_in)`` for a contiguous
    ``[B, T, I]`` CPU activation, ``reduce(xf, delta, per_token)`` is ``call`` on contiguous
    features and output gradient. Nothing is checked in Python per call: inside a training
    step, with the caches cold from the model's own work, a call's few dozen Python-level checks
    cost as much as a small layer's kernel (measured in ``tools/bench_capture.py --profile``).
    The bindings check every call in C++ instead (dims, dtypes, contiguity, devices, B and T,
    and every table entry against the call's widths: ``csrc/bindings.cpp``, ``csrc/cpu/
    common.h``) and raise RuntimeError, so a bad call reads nothing out of bounds; the caller
    then takes the checked path (``call``, the op), which raises the precise error or computes
    the same result.
    """
    ext = _host_extension(idx_in, call)
    if ext is None:
        return None
    gather_columns, factgrass_ext = ext.gather_columns, ext.factgrass
    tables, scale = call.tables, call.scale

    def gather(x: Tensor) -> Tensor:
        return gather_columns(x, idx_in)

    def reduce(xf: Tensor, delta: Tensor, per_token: bool) -> Tensor:
        return factgrass_ext(xf, delta, *tables, scale, per_token)

    return gather, reduce


def native_hook(name: str, idx_in: Tensor, call: FactGraSSCall, fallback):
    """A factorized layer's capture hooks in C++ (``csrc/cpu/capture_hook.cpp``), or None where
    the extension does not run (no extension, tables not on the CPU).

    The returned ``CaptureHook`` is the module's forward hook: a plain contiguous 3-D CPU
    activation is gathered and a C++ hook on the output runs ``call``'s kernel when delta
    arrives, with no Python per layer and step; ``take()`` then gives ``(result, features,
    gradient)``: the ``[B, K]`` result, or the features and gradient of a call the kernel
    refused, for the checked path. Every other activation goes to ``fallback`` (the Python
    hook). Per-example rows only (``per_token=False``)."""
    ext = _host_extension(idx_in, call)
    if ext is None:
        return None
    return ext.CaptureHook(name, idx_in, *call.tables, call.scale, Tensor, fallback)


def _host_extension(idx_in: Tensor, call: FactGraSSCall):
    """The extension, where a layer's direct CPU paths can use it: built, tables on the CPU."""
    ext = build.extension()
    if ext is None or call.device.type != "cpu" or idx_in.device.type != "cpu":
        return None
    return ext
