"""The package's collectives: the one module that calls torch.distributed's communication ops.

Why one module: NCCL (every multi-GPU run) takes only CUDA tensors, gloo (every CPU test) takes
anything, so a collective on a CPU tensor passes every CPU test and kills the first multi-GPU
run. Every tensor collective here is issued on ``device()`` — the device the process group's
backend takes (the GPU of this rank under NCCL, the CPU under gloo) — and its result is handed
back on the caller's device. Small control messages (Python objects, agreed integers, errors)
travel the same way. ``tests/strict_dist.py`` rejects, in the 2-process CPU tests, any
collective that package code issues outside this module, or on a tensor that is not on
``device()``.

All functions are no-ops (or identities) when torch.distributed is not initialized, so a
single process needs no special casing.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


class RankFailure(RuntimeError):
    """Another rank failed in a guarded region; carries that rank's error message."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def device() -> torch.device:
    """The device the process group's backend takes: this rank's GPU under NCCL (set by
    ``init_distributed`` via ``torch.cuda.set_device``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``device()``, contiguous (a copy only when it is not already there)."""
    return t.to(device()).contiguous()


def all_reduce(t: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """The element-wise reduction of ``t`` over the group, on ``t``'s device (``t`` itself is
    updated in place when it already lives on ``device()``)."""
    if not initialized():
        return t
    work = _staged(t)
    dist.all_reduce(work, op=op, group=group)
    if work.data_ptr() != t.data_ptr():
        t.copy_(work)
    return t


def reduce(t: torch.Tensor, dst: int, op=ReduceOp.SUM, group=None) -> torch.Tensor | None:
    """Reduce ``t`` to global rank ``dst``: the result (on ``t``'s device) there, None on the
    other ranks (whose buffers are scratch afterwards)."""
    if not initialized():
        return t
    work = _staged(t)
    dist.reduce(work, dst=dst, op=op, group=group)
    if rank() != dst:
        return None
    return work if work.device == t.device else work.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """``t`` of rank ``src`` on every rank (same shape and dtype everywhere), on ``t``'s
    device."""
    if not initialized():
        return t
    work = _staged(t)
    dist.broadcast(work, src=src, group=group)
    if work.data_ptr() != t.data_ptr():
        t.copy_(work)
    return t


def broadcast_object(obj=None, src: int = 0, group=None):
    """A picklable object from global rank ``src`` to every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=device())
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj``, in rank order."""
    if not initialized():
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's ``obj`` on global rank ``dst``, in rank order; None on the other ranks
    (e.g. each rank's top-k lists, merged on rank 0 only)."""
    if not initialized():
        return [obj]
    out = [None] * world_size(group) if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def agree(value: int, op: str = "max", group=None) -> int:
    """One integer every rank agrees on: the max (or min, or sum) of the ranks' values."""
    if not initialized():
        return int(value)
    ops = {"max": ReduceOp.MAX, "min": ReduceOp.MIN, "sum": ReduceOp.SUM}
    t = torch.tensor([int(value)], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=ops[op], group=group)
    return int(t.item())


def barrier(group=None) -> None:
    if initialized():
        # NCCL's barrier needs to know the device; pass it when the backend has one.
        if device().type == "cuda":
            dist.barrier(group=group, device_ids=[device().index])
        else:
            dist.barrier(group=group)


def raise_if_any_failed(err: BaseException | None, what: str = "") -> None:
    """Collective: every rank passes its own error (or None); if any rank failed, every rank
    raises — the failing rank its own exception, the others a ``RankFailure`` naming the first
    failed rank and its message. Call it on every rank at the same point."""
    if not initialized():
        if err is not None:
            raise err
        return
    msg = None if err is None else f"{type(err).__name__}: {err}"
    failures = [(r, m) for r, m in enumerate(all_gather_object(msg)) if m is not None]
    if err is not None:
        raise err
    if failures:
        r, m = failures[0]
        where = f" while {what}" if what else ""
        raise RankFailure(f"rank {r} failed{where}: {m}")


@contextmanager
def guarded(what: str = "") -> Iterator[None]:
    """Run a block on every rank; if it raises anywhere, every rank raises (see
    ``raise_if_any_failed``) instead of the others waiting in the next collective until the
    timeout. Any exception counts (OSError, KeyError, ...), not only expected ones."""
    err = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        err = e
        if os.environ.get("GRASS_LLM_DEBUG"):
            traceback.print_exc()
    raise_if_any_failed(err, what)
