"""Read-ahead over a store's row chunks: rows decoded and on the compute device before they are
needed, so that reading, decoding and arithmetic overlap.

Worker threads read and decode the next ``depth`` jobs while the caller computes on the current
one (Zarr's file reads and checksums and numpy's casts release the GIL). Decoding to float32
runs in numpy on the CPU (torch's float16 -> float32 cast on CPU is ~10x slower than numpy's,
measured in tools/bench_query.py); for a CUDA device the raw 16-bit rows are copied (half the
bytes of float32) on a side stream and cast there. Shapes: R rows of a chunk, K a layer's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.store import GradientStore


@dataclass
class Job:
    """Rows ``[start, stop)`` of the listed layers (one row chunk ``c``, usually)."""

    c: int
    start: int
    stop: int
    layers: tuple[str, ...]


def chunk_jobs(store: GradientStore, chunks: Sequence[int], layers: Sequence[str]) -> list[Job]:
    """One job per row chunk, reading every listed layer."""
    out = []
    for c in chunks:
        a, b = store.layout.chunk_range(c)
        out.append(Job(c, a, b, tuple(layers)))
    return out


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
    return raw.astype(np_dtype, copy=False)


def _read(store: GradientStore, job: Job, device: torch.device, dtype: torch.dtype,
          stream) -> tuple[Job, dict[str, torch.Tensor], object]:
    """Runs in a worker thread: the job's rows on ``device`` as ``dtype``."""
    rows = {}
    if device.type == "cpu":
        for name in job.layers:
            raw = store.read_raw(name, job.start, job.stop)
            rows[name] = torch.from_numpy(decode_rows(store, raw, dtype))
        return job, rows, None
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
               dtype: torch.dtype = torch.float32,
               depth: int = 2) -> Iterator[tuple[Job, dict[str, torch.Tensor]]]:
    """Yield ``(job, {layer: [R, K] tensor on device})`` for every job in order, with up to
    ``depth`` jobs being read ahead in worker threads.

    Memory: at most ``depth + 1`` jobs' rows are held at once.
    """
    if depth < 1:
        raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
    streams = ([torch.cuda.Stream(device) for _ in range(depth)] if device.type == "cuda"
               else [None] * depth)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="grass-read") as pool:
        pending: deque = deque()
        it = iter(enumerate(jobs))
        for i, job in it:
            pending.append(pool.submit(_read, store, job, device, dtype, streams[i % depth]))
            if len(pending) >= depth:
                break
        while pending:
            job, rows, done = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                i, j = nxt
                pending.append(pool.submit(_read, store, j, device, dtype, streams[i % depth]))
            if done is not None:  # the compute stream waits for the copy; keep the memory
                current = torch.cuda.current_stream(device)  # alive until it is used there
                current.wait_event(done)
                for t in rows.values():
                    t.record_stream(current)
            yield job, rows
