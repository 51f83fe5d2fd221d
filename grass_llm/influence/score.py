"""Scores streamed over a store: top-k, the full matrix, self-influence, valuation.

``s(q, i) = sum_l q~_l^T g_il`` with ``q~_l = (F_l + lambda_l I)^-1 q_l`` precomputed once, so a
pass over the store is one GEMM per layer and row chunk, with memory bounded by one chunk.
The running top-k per query is merged chunk by chunk, in a Numba kernel when Numba is present
(a torch ``topk`` over [current top-k, chunk scores] otherwise; both are tested against a full
sort). Shapes: Q queries, R rows of a chunk, K top-k size.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from grass_llm.influence.fisher import load_factors, precondition
from grass_llm.store import GradientStore

try:
    import numba

    @numba.njit(parallel=True, cache=True)
    def _merge_topk_numba(scores, offset, vals, idx):  # pragma: no cover - compiled
        Q, R = scores.shape
        K = vals.shape[1]
        for q in numba.prange(Q):
            mpos = 0
            for j in range(1, K):
                if vals[q, j] < vals[q, mpos]:
                    mpos = j
            for r in range(R):
                v = scores[q, r]
                if v > vals[q, mpos]:
                    vals[q, mpos] = v
                    idx[q, mpos] = offset + r
                    mpos = 0
                    for j in range(1, K):
                        if vals[q, j] < vals[q, mpos]:
                            mpos = j

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def _fp16_scores_numba(q, g_bits, lut):  # pragma: no cover - compiled
        Q, K = q.shape
        R = g_bits.shape[0]
        out = np.zeros((Q, R))
        for r in numba.prange(R):
            acc = np.zeros(Q, dtype=np.float32)
            for j in range(K):
                v = lut[g_bits[r, j]]
                for t in range(Q):
                    acc[t] += q[t, j] * v
            for t in range(Q):
                out[t, r] = acc[t]
        return out

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


# float16 bit pattern -> float32 value, for the fused decode-and-score kernel
_HALF_LUT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


class TopK:
    """Running top-k of every query row over streamed score chunks."""

    def __init__(self, n_queries: int, k: int, backend: str = "auto"):
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got {k}")
        if backend == "auto":
            backend = "numba" if HAVE_NUMBA else "torch"
        if backend not in ("numba", "torch"):
            raise ValueError(f"backend must be numba, torch or auto, got {backend!r}")
        self.k, self.backend = k, backend
        self.vals = np.full((n_queries, k), -np.inf, dtype=np.float64)
        self.idx = np.full((n_queries, k), -1, dtype=np.int64)

    def update(self, scores_QR: np.ndarray, offset: int) -> None:
        scores = np.ascontiguousarray(scores_QR, dtype=np.float64)
        if self.backend == "numba":
            _merge_topk_numba(scores, offset, self.vals, self.idx)
            return
        both_v = torch.from_numpy(np.concatenate([self.vals, scores], axis=1))
        cols = np.arange(offset, offset + scores.shape[1])[None].repeat(scores.shape[0], 0)
        both_i = torch.from_numpy(np.concatenate([self.idx, cols], axis=1))
        v, pos = both_v.topk(min(self.k, both_v.shape[1]), dim=1)
        self.vals = np.ascontiguousarray(v.numpy())
        self.idx = np.ascontiguousarray(torch.gather(both_i, 1, pos).numpy())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values [Q, K], row indices [Q, K])``, best first; ties by lower row index;
        unfilled slots (fewer rows than k) have index -1."""
        order = np.lexsort((self.idx, -self.vals), axis=1) if self.vals.size else self.idx
        return (np.take_along_axis(self.vals, order, 1), np.take_along_axis(self.idx, order, 1))


def fetch_chunk(store: GradientStore, names, c: int, backend: str = "torch") -> dict:
    """Row chunk c of every layer, ready to score: float32 tensors (torch backend) or the raw
    float16 bit patterns (the fused Numba backend)."""
    a, b = store.layout.chunk_range(c)
    if backend == "numba" and HAVE_NUMBA and store.layout.dtype == "float16":
        return {n: store.read_raw(n, a, b).view(np.uint16) for n in names}
    return {n: store.read_rows_torch(n, a, b) for n in names}


def score_rows(pre32: dict[str, torch.Tensor], rows: dict) -> np.ndarray:
    """``sum_l q~_l @ g_l^T`` for one fetched chunk: ``[Q, R]`` float64 (layer sum in float64)."""
    total = None
    for name, q in pre32.items():
        g = rows[name]
        s = (_fp16_scores_numba(q.numpy(), g, _HALF_LUT) if isinstance(g, np.ndarray)
             else (q @ g.T).double().numpy())
        total = s if total is None else total + s
    return total


def chunk_scores(store: GradientStore, pre: dict[str, torch.Tensor], c: int, *,
                 backend: str = "torch") -> np.ndarray:
    """Scores of all queries against row chunk c: ``[Q, R]`` float64.

    Each layer's GEMM runs in float32 on the decoded rows (the rows are stored in at most 32
    bits); the sum over layers is float64. ``backend="numba"`` decodes float16 rows and
    accumulates in one fused pass instead (slower than torch here: tools/bench_query.py).
    """
    pre32 = {n: q.float() for n, q in pre.items()}
    return score_rows(pre32, fetch_chunk(store, list(pre32), c, backend))


def _prefetched(store: GradientStore, names, backend: str):
    """Yield ``(c, rows)`` for every chunk, reading chunk c + 1 in a thread while chunk c is
    scored: Zarr's file reads, checksums and dtype conversion release the GIL."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        n = store.layout.n_chunks
        nxt = pool.submit(fetch_chunk, store, names, 0, backend) if n else None
        for c in range(n):
            rows = nxt.result()
            if c + 1 < n:
                nxt = pool.submit(fetch_chunk, store, names, c + 1, backend)
            yield c, rows


def stream_top_k(store: GradientStore, pre: dict[str, torch.Tensor], k: int, *,
                 matrix_out=None, backend: str = "auto", score_backend: str = "torch",
                 progress: Callable[[int, int], None] | None = None):
    """Top-k training rows per query over the whole store; optionally every score into
    ``matrix_out`` (a ``[Q, n]`` array-like, e.g. a chunked Zarr array)."""
    store.require_complete()
    pre32 = {n: q.float() for n, q in pre.items()}
    n_q = next(iter(pre32.values())).shape[0]
    top = TopK(n_q, min(k, store.n_examples), backend)
    for c, rows in _prefetched(store, list(pre32), score_backend):
        s = score_rows(pre32, rows)
        a, b = store.layout.chunk_range(c)
        if matrix_out is not None:
            matrix_out[:, a:b] = s.astype(np.float32)
        top.update(s, a)
        if progress is not None:
            progress(c + 1, store.layout.n_chunks)
    return top.result()


def self_influence(store: GradientStore, *, progress=None) -> np.ndarray:
    """``s(i, i) = sum_l g_il^T (F_l + lambda_l I)^-1 g_il`` for every row: ``[n]``."""
    store.require_complete()
    factors = load_factors(store)
    out = np.zeros(store.n_examples)
    for c in range(store.layout.n_chunks):
        a, b = store.layout.chunk_range(c)
        for lay in store.layout.layers:
            g = torch.from_numpy(store.read_rows(lay.name, a, b)).double()
            solved = torch.cholesky_solve(g.T, factors[lay.name]).T
            out[a:b] += (g * solved).sum(1).numpy()
        if progress is not None:
            progress(c + 1, store.layout.n_chunks)
    return out


def valuation(store: GradientStore, target_grads: dict[str, torch.Tensor], *,
              progress=None) -> np.ndarray:
    """``v_i = sum_q s(q, i)``: one preconditioned summed target gradient, one pass: ``[n]``."""
    store.require_complete()
    summed = {k: v.double().sum(0, keepdim=True) for k, v in target_grads.items()}
    pre32 = {n: q.float() for n, q in precondition(load_factors(store), summed).items()}
    out = np.zeros(store.n_examples)
    for c, rows in _prefetched(store, list(pre32), "torch"):
        a, b = store.layout.chunk_range(c)
        out[a:b] = score_rows(pre32, rows)[0]
        if progress is not None:
            progress(c + 1, store.layout.n_chunks)
    return out
