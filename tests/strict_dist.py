"""A strict torch.distributed for the multi-process CPU tests: rejects what NCCL would reject,
and any collective that package code issues without going through ``grass_llm.parallel.comm``.

Why: the CPU tests run on gloo, which takes tensors on any device, any dtype, bitwise ops. NCCL
(every multi-GPU run) takes only tensors on the rank's GPU, so a collective on a CPU tensor
passes every CPU test and crashes the first GPU run. On a CPU machine every tensor is on the
CPU, so the device rule alone cannot tell a bookkeeping tensor from a model tensor; what makes
the class of bug visible here is the origin rule: every collective issued by code in
``grass_llm/`` must come from ``grass_llm/parallel/comm.py``, which stages tensors on the
backend's device (``comm.device()``: the GPU under NCCL). Torch's own internals (FSDP2, DTensor,
DeepSpeed) are checked by the device/dtype/op rules only.

Rules, per call of a patched ``torch.distributed`` function:

1. origin: the immediate caller is not a ``grass_llm`` module other than ``parallel/comm.py``;
2. device: every tensor argument is on ``comm.device()``;
3. NCCL's limits: dense, contiguous, a dtype NCCL has, no bitwise reduce ops.

A violation prints what and where, then ends the process at once (exit code 86), so the
launcher stops the other ranks instead of leaving them in a collective until the timeout.

Install it first thing in a rank's process: ``install()`` (``tests/strict_main.py`` does,
then runs the CLI).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_CODE = 86
_PKG = Path(__file__).resolve().parents[1] / "grass_llm"
_COMM = _PKG / "parallel" / "comm.py"
# ncclDataType_t: int8/uint8/int32/uint32/int64/uint64/half/float/double/bfloat16/fp8; torch
# sends bool as uint8.
NCCL_DTYPES = {torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32,
               torch.float64, torch.bfloat16, torch.bool}
_TENSOR_OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv")
_OBJECT_OPS = ("broadcast_object_list", "all_gather_object", "gather_object",
               "scatter_object_list", "barrier", "monitored_barrier")
_BITWISE = {dist.ReduceOp.BAND, dist.ReduceOp.BOR, dist.ReduceOp.BXOR}


class StrictCollectiveError(RuntimeError):
    pass


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def check_call(op: str, caller: str, args=(), kwargs=None, *, expected_device=None) -> None:
    """Raise StrictCollectiveError if a call of ``op`` from file ``caller`` breaks a rule."""
    kwargs = kwargs or {}
    path = Path(caller).resolve() if caller and not caller.startswith("<") else None
    if path is not None and _PKG in path.parents and path != _COMM:
        raise StrictCollectiveError(
            f"{op} called directly from {path.relative_to(_PKG.parent)}: package code must use "
            "grass_llm.parallel.comm, which puts tensors on the backend's device (NCCL takes "
            "only CUDA tensors)")
    if expected_device is None:
        from grass_llm.parallel import comm

        expected_device = comm.device()
    for t in _tensors(args, kwargs):
        if t.device != expected_device:
            raise StrictCollectiveError(f"{op} on a tensor on {t.device}; the backend takes "
                                        f"{expected_device}")
        if t.layout != torch.strided or not t.is_contiguous():
            raise StrictCollectiveError(f"{op} on a sparse or non-contiguous tensor")
        if t.dtype not in NCCL_DTYPES:
            raise StrictCollectiveError(f"{op} on dtype {t.dtype}, which NCCL does not have")
    red = kwargs.get("op")
    if red is None:
        red = next((a for a in args if isinstance(a, dist.ReduceOp.RedOpType)), None)
    if red in _BITWISE:
        raise StrictCollectiveError(f"{op} with {red}: NCCL has no bitwise reductions")


def _wrap(name, fn):
    @functools.wraps(fn)
    def strict(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        try:
            check_call(name, caller, args if name in _TENSOR_OPS else (),
                       kwargs if name in _TENSOR_OPS else {})
        except StrictCollectiveError as err:
            sys.stderr.write(f"STRICT COLLECTIVES (rank {os.environ.get('RANK', '?')}): {err}\n")
            traceback.print_stack(sys._getframe(1), file=sys.stderr)
            sys.stderr.flush()
            os._exit(EXIT_CODE)
        return fn(*args, **kwargs)

    strict.__grass_strict__ = True
    return strict


def install() -> None:
    """Patch torch.distributed's collectives in this process (idempotent)."""
    from torch.distributed import distributed_c10d as c10d

    for name in _TENSOR_OPS + _OBJECT_OPS:
        for mod in (dist, c10d):
            fn = getattr(mod, name, None)
            if fn is not None and not getattr(fn, "__grass_strict__", False):
                setattr(mod, name, _wrap(name, fn))
    os.environ["GRASS_LLM_STRICT_DIST"] = "1"
