"""The host heap during a step loop: glibc's malloc kept from handing memory back between steps.

A step of the cache job allocates its activations, gradients and features and frees them all
before the next step. glibc's malloc returns freed memory to the kernel when more than its trim
threshold lies free at the top of its heap, and serves requests above its mmap threshold with
fresh mappings; by default both thresholds move with the program's history (glibc's dynamic
threshold). Depending on that history a step loop can then fault in thousands of pages again on
every step: measured on the tiny Llama of ``docs/benchmarks.md``, 0 to 5,000 minor faults per
capture step (the same code, different histories), at ~3 us each, ~5% of the step's time.

``steady_heap()`` fixes the thresholds for the duration of a loop: requests up to 32 MiB come
from the heap, and free memory stays mapped for the next step to reuse. Larger requests (a big
vocabulary's logits) keep their own mappings: on the heap they fragmented it, and the cache
job's peak RSS on SmolLM2 rose by 13-20%. With 32 MiB it was unchanged (3.6-3.8 GiB either
way, docs/benchmarks.md). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold (64-bit)
RETAIN = 2**31 - 1  # the trim threshold inside a loop: mallopt takes a C int
AFTER_TRIM = 64 << 20  # and after it: what glibc's dynamic mode sets with that mmap threshold

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The process's glibc, or None (another C library, or a platform without one)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_LIBC = _glibc()


def available() -> bool:
    """Whether ``steady_heap`` changes anything here (the process runs on glibc)."""
    return _LIBC is not None


def active() -> bool:
    """Whether a ``steady_heap`` block is running now (and changed anything: glibc)."""
    return _LIBC is not None and _depth > 0


@contextmanager
def steady_heap() -> Iterator[bool]:
    """Keep freed host memory mapped, and requests up to 32 MiB on the heap, inside the block.

    Yields whether the policy is in effect (glibc). Nested and concurrent uses share one
    policy. The outermost exit sets the trim threshold to 64 MiB and returns the free memory
    to the kernel (``malloc_trim``). The mmap threshold stays at 32 MiB: glibc has no call
    that turns its dynamic mode back on, and 32 MiB is where that mode's threshold tops out.
    """
    global _depth
    if _LIBC is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, RETAIN)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, AFTER_TRIM)
                _LIBC.malloc_trim(0)
