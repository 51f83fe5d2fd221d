"""Index tables checked once per tensor, so a bad table is refused before any kernel reads it.

The kernels index memory with their tables (``idx_in``, ``idx_out``, the SJLT's ``indptr`` /
``src``, ``rows``): an entry out of range is an out-of-bounds read, which on CUDA is an illegal
memory access that poisons the process. The tables are constants of a compressor, so their
statistics (min, max; for ``indptr`` also first, last and whether it is non-decreasing) are
computed once per tensor and cached; every call then only compares them with the call's sizes.

- Compressors register the statistics of each device copy from the host array it was made
  from (``remember``), so their tables never cost a device synchronization.
- Any other tensor (a caller's own table) is measured on its first use: one small reduction
  and, on CUDA, one synchronization; then cached like the others.

The cache is keyed by the tensor object and its version counter: an in-place edit of a table
makes it be measured again, and an entry goes away with its tensor.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Stats:
    """Summary of an int64 table: ``lo``/``hi`` its min/max (0/-1 when empty), ``first``/``last``
    its first/last entry and ``monotone`` whether a 1-D table never decreases."""

    lo: int
    hi: int
    first: int
    last: int
    monotone: bool


_EMPTY = Stats(0, -1, 0, -1, True)
# Re-entrant: a garbage collection can free a remembered tensor while this thread holds the
# lock (any allocation may trigger one), and that tensor's weakref callback takes it again.
_lock = threading.RLock()
_known: dict[int, tuple[weakref.ref, int | None, Stats]] = {}
measured = 0  # tables measured on the device so far (the tests count it)


def version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place edit), None for inference tensors."""
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and are not edited)
        return None


def stats_of_array(a: np.ndarray) -> Stats:
    """The statistics of a host array (what ``remember`` records for its device copy)."""
    if a.size == 0:
        return _EMPTY
    flat = a.reshape(-1)
    monotone = a.ndim == 1 and bool(np.all(flat[1:] >= flat[:-1]))
    return Stats(int(flat.min()), int(flat.max()), int(flat[0]), int(flat[-1]), monotone)


def _measure(t: torch.Tensor) -> Stats:
    global measured
    measured += 1
    if t.numel() == 0:
        return _EMPTY
    flat = t.reshape(-1)
    lo, hi = torch.aminmax(flat)
    if t.dim() == 1 and t.numel() > 1:
        mono = (flat[1:] >= flat[:-1]).all().to(flat.dtype)
    else:
        mono = torch.ones((), dtype=flat.dtype, device=flat.device)
    vals = torch.stack([lo, hi, flat[0], flat[-1], mono]).tolist()  # one synchronization
    return Stats(vals[0], vals[1], vals[2], vals[3], bool(vals[4]) and t.dim() == 1)


def _store(t: torch.Tensor, stats: Stats) -> None:
    key = id(t)

    def forget(_ref, key=key):
        with _lock:
            entry = _known.get(key)
            if entry is not None and entry[0] is _ref:
                del _known[key]

    entry = (weakref.ref(t, forget), version(t), stats)
    with _lock:
        _known[key] = entry


def remember(t: torch.Tensor, array: np.ndarray) -> None:
    """Record that ``t`` is an unmodified copy of the host ``array`` (no device work)."""
    _store(t, stats_of_array(array))


def stats(t: torch.Tensor) -> Stats:
    """The cached statistics of ``t``, measuring it first if it is new or was edited."""
    entry = _known.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == version(t):
        return entry[2]
    s = _measure(t)
    _store(t, s)
    return s


def check_range(t: torch.Tensor, name: str, stop: int, what: str) -> None:
    """Raise ValueError unless every entry of ``t`` lies in ``[0, stop)``; ``what`` says why."""
    s = stats(t)
    if s.hi >= s.lo and (s.lo < 0 or s.hi >= stop):
        raise ValueError(f"{name} entries must lie in [0, {stop}) ({what}), got values in "
                         f"[{s.lo}, {s.hi}]: the table does not fit this call's tensors (built "
                         "for another layer, or corrupted)")


def check_csr(indptr: torch.Tensor, src: torch.Tensor, width: int, what: str) -> None:
    """Raise ValueError unless ``indptr``/``src`` form a CSR over ``width`` input positions."""
    s = stats(indptr)
    if s.first != 0 or s.last != src.numel() or not s.monotone:
        raise ValueError(f"indptr must be non-decreasing from 0 to nnz = len(src) = "
                         f"{src.numel()}, got first {s.first}, last {s.last}"
                         f"{'' if s.monotone else ', decreasing somewhere'}: not an SJLT table")
    check_range(src, "src", width, what)
