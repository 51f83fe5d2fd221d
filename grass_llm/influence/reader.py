"""Read-ahead over a store's row chunks: rows decoded and on the compute device before they are
needed, so that reading, decoding and arithmetic overlap.

Worker threads read and decode the next ``depth`` jobs while the caller works on the current one
(Zarr's file reads and checksums, the decoders and torch's kernels release the GIL); on the CPU
a job's own arithmetic can run in its worker too (``then``), so that ``depth`` chunks are scored
in parallel. A job is one row chunk of a few layers (``MAX_JOB_BYTES`` of decoded rows at most:
a whole 1024-row chunk of an 8B store is 1.9 GiB), so memory stays at ``depth + 1`` jobs.

Decoding on the CPU: float16 through a compiled exact decoder (torch's float16 -> float32 cast on
CPU runs at ~0.13 GB/s, numpy's at ~1.2, this one at ~2.9 on one core, measured here), bfloat16
by a shift (the high half of a float32). For a CUDA device the raw 16-bit rows are copied (half
the bytes of float32) on a side stream and cast there. Shapes: R rows of a chunk, K a layer size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.store import GradientStore

MAX_JOB_BYTES = 64 * 2**20  # decoded float32 rows per job

try:
    import numba

    @numba.njit(nogil=True, cache=True)
    def _half_to_float(src, out, pow2, sign):  # pragma: no cover - compiled
        """float16 bit patterns -> float32/64 values, exact for finite values: the 11-bit
        significand times a power of two (a table), branch-free so that it vectorizes."""
        s, o = src.ravel(), out.ravel()
        special = 0
        for i in range(s.size):
            h = np.int32(s[i])
            e = (h >> 10) & 0x1F
            full = (h & 0x3FF) + (np.int32(e > 0) << 10)
            o[i] = np.float32(full) * pow2[e] * sign[h >> 15]
            special |= np.int32(e == 31)
        return special

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

# exponent field e -> 2^(e - 25) (2^-24 for subnormals, e = 0); e = 31 is inf/NaN (fixed below)
_POW2 = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)
_SIGN = np.array([1.0, -1.0], dtype=np.float32)


@dataclass
class Job:
    """Rows ``[start, stop)`` of row chunk ``c`` for the listed layers; ``last``: the chunk's
    last job (jobs of one chunk are consecutive)."""

    c: int
    start: int
    stop: int
    layers: tuple[str, ...]
    last: bool = True


def chunk_jobs(store: GradientStore, chunks: Sequence[int], layers: Sequence[str], *,
               max_bytes: int = MAX_JOB_BYTES) -> list[Job]:
    """Jobs covering the listed layers of each row chunk, in order, each at most ``max_bytes``
    of float32 rows (at least one layer)."""
    ks = {x.name: x.k for x in store.layout.layers}
    out = []
    for c in chunks:
        a, b = store.layout.chunk_range(c)
        groups, cur, size = [], [], 0
        for name in layers:
            nbytes = (b - a) * ks[name] * 4
            if cur and size + nbytes > max_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(name)
            size += nbytes
        groups.append(cur)
        out += [Job(c, a, b, tuple(g), last=i == len(groups) - 1) for i, g in enumerate(groups)]
    return out


def cpu_workers() -> int:
    """Worker threads for CPU passes: this process's share of the usable cores (the ranks of a
    node share them: torchrun's LOCAL_WORLD_SIZE), plus one to cover file reads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local_ranks) + 1


@contextmanager
def single_threaded_ops():
    """torch ops single-threaded for the duration: when several worker threads each run their
    own GEMMs, OpenMP teams inside each would fight over the same cores (measured: 4x slower on
    two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): this process's GPU when there is one (under torchrun, the one
    ``init_distributed`` selected), else the CPU; otherwise the device named."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no GPU")
    return dev


def decode_rows(store: GradientStore, raw: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Stored rows (float16, uint16 bfloat16 bits, float32) -> a numpy array of ``dtype``
    (float32 or float64); exact, every stored format fits float32."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    if store.layout.dtype == "bfloat16":  # bfloat16 = the high half of a float32
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    elif store.layout.dtype == "float16" and HAVE_NUMBA:
        out = np.empty(raw.shape, dtype=np_dtype)
        if _half_to_float(np.ascontiguousarray(raw).view(np.uint16), out, _POW2, _SIGN):
            return raw.astype(np_dtype)  # inf/NaN present (verify would flag them): exact path
        return out
    return raw.astype(np_dtype, copy=False)


def _read(store: GradientStore, job: Job, device: torch.device, dtype: torch.dtype,
          stream, then) -> tuple[Job, object, object]:
    """Runs in a worker thread: the job's rows on ``device`` as ``dtype`` (or, CPU, ``then`` of
    them)."""
    rows = {}
    if device.type == "cpu":
        for name in job.layers:
            raw = store.read_raw(name, job.start, job.stop)
            rows[name] = torch.from_numpy(decode_rows(store, raw, dtype))
        return job, (rows if then is None else then(job, rows)), None
    with torch.cuda.stream(stream):
        for name in job.layers:
            raw = store.read_raw(name, job.start, job.stop)
            if store.layout.dtype == "bfloat16":
                t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(raw)
            rows[name] = t.to(device, non_blocking=True).to(dtype)
        done = torch.cuda.Event()
        done.record(stream)
    return job, rows, done


def read_ahead(store: GradientStore, jobs: Sequence[Job], *, device: torch.device,
               dtype: torch.dtype = torch.float32, depth: int = 2,
               then: Callable[[Job, dict], object] | None = None) -> Iterator[tuple[Job, object]]:
    """Yield ``(job, {layer: [R, K] tensor on device})`` for every job in order, with up to
    ``depth`` jobs being read ahead in worker threads.

    ``then`` (CPU only): a function of ``(job, rows)`` run in the worker thread; its result is
    yielded instead of the rows. Memory: at most ``depth + 1`` jobs' rows are held at once.
    """
    if depth < 1:
        raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
    if then is not None and device.type != "cpu":
        raise ValueError("then= runs in worker threads: CPU only")
    streams = ([torch.cuda.Stream(device) for _ in range(depth)] if device.type == "cuda"
               else [None] * depth)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="grass-read") as pool:
        pending: deque = deque()
        it = iter(enumerate(jobs))
        for i, job in it:
            pending.append(pool.submit(_read, store, job, device, dtype, streams[i % depth],
                                       then))
            if len(pending) >= depth:
                break
        while pending:
            job, rows, done = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                i, j = nxt
                pending.append(pool.submit(_read, store, j, device, dtype, streams[i % depth],
                                           then))
            if done is not None:  # the compute stream waits for the copy; keep the memory
                current = torch.cuda.current_stream(device)  # alive until it is used there
                current.wait_event(done)
                for t in rows.values():
                    t.record_stream(current)
            yield job, rows
