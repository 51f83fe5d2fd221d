"""Sparse compressors: RandomMask, SJLT and their composition GraSS (DESIGN.md, contract).

- ``RandomMask(p, k)``: ``g -> g[S]`` for a fixed sorted subset S, no rescaling.
- ``SJLT(p, k, c)``: input coordinate j is added, with sign ``s_r(j)``, to row ``h_r(j)`` for
  r = 1..c, and the output is scaled by ``1/sqrt(c)``. The c rows of a column are distinct
  (block construction: repetition r hashes into the r-th of c contiguous row blocks), so
  every column has exactly c nonzeros and ``E<Pg, Ph> = <g, h>``.
- ``GraSS(p, k, k_prime, c)`` = ``SJLT(k_prime, k, c) o RandomMask(p, k_prime)``: O(k') work
  per vector, independent of p.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from grass_llm.compress._hash import (
    derive_seed,
    random_signs,
    sample_indices,
    uniform_index,
)
from grass_llm.compress.base import VectorCompressor, check_size, check_sizes
from grass_llm import kernels


class _DeviceCache:
    """Keeps a table on every device (and dtype) it was asked for, built once from numpy.

    An integer table's copies are registered with ``kernels.tables`` along with the range of
    the array they were copied from, so the kernels check them against each call's sizes
    without measuring them on the device.
    """

    def __init__(self, array: np.ndarray):
        self.array = array
        self._by_key: dict[tuple[torch.device, torch.dtype | None], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._by_key:
            t = torch.from_numpy(self.array)
            index = dtype is None and np.issubdtype(self.array.dtype, np.integer)
            # An index table is copied even on the CPU: a tensor sharing the array's memory
            # would change, unseen by the checks, whenever the array is edited.
            t = t.to(device=device, dtype=dtype or t.dtype, copy=index)
            if index:
                kernels.tables.remember(t, self.array)
            self._by_key[key] = t
        return self._by_key[key]


def sjlt_tables(p: int, k: int, c: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[c, p]`` (int64) and signs ``[c, p]`` (float64) of an SJLT, as pure functions of key.

    Counter of (repetition r, coordinate j) is ``r * p + j`` for the row and the sign streams,
    which are separate keys derived from ``key``.
    """
    row_key, sign_key = derive_seed(key, "rows"), derive_seed(key, "signs")
    counters = np.arange(c * p, dtype=np.uint64).reshape(c, p)
    starts = [r * k // c for r in range(c + 1)]
    rows = np.empty((c, p), dtype=np.int64)
    for r in range(c):
        size = starts[r + 1] - starts[r]
        rows[r] = starts[r] + uniform_index(row_key, counters[r], size)
    return rows, random_signs(sign_key, counters)


def sjlt_csr(rows: np.ndarray, signs: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR of an SJLT's transpose, the form the kernels take (grass_llm/kernels).

    Args:
        rows: ``[c, n]`` output row of each (repetition, coordinate).
        signs: ``[c, n]`` the matching signs.
        k: number of outputs.

    Returns:
        ``indptr [k+1]`` (int64), ``src [c*n]`` (int64 coordinate) and ``sgn [c*n]`` (float32):
        output j sums ``sgn[e] * v[src[e]]`` over ``e in [indptr[j], indptr[j+1])``, in
        ascending (repetition, coordinate) order.
    """
    n = rows.shape[1]
    flat = rows.reshape(-1)
    order = np.argsort(flat, kind="stable")
    indptr = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=k), out=indptr[1:])
    return indptr, (order % n).astype(np.int64), signs.reshape(-1)[order].astype(np.float32)


class CsrTables:
    """An SJLT's transpose CSR on every device it is used on (see ``sjlt_csr``).

    The row table is validated here, once: every entry must name one of the k outputs (a
    table that does not would index outside the kernels' output).
    """

    def __init__(self, rows: np.ndarray, signs: np.ndarray, k: int):
        _validate_sjlt_tables(rows, signs, k)
        self._parts = [_DeviceCache(a) for a in sjlt_csr(rows, signs, k)]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indptr, src, sgn = (p.get(device) for p in self._parts)
        return indptr, src, sgn


def _validate_sjlt_tables(rows: np.ndarray, signs: np.ndarray, k: int) -> None:
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"SJLT rows must be a 2-D integer array [c, n], got {rows.dtype} "
                         f"{rows.shape}")
    if signs.shape != rows.shape:
        raise ValueError(f"SJLT signs {signs.shape} must have the shape of rows {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= k):
        raise ValueError(f"SJLT rows must lie in [0, k={k}), got values in "
                         f"[{rows.min()}, {rows.max()}]")
    if not np.all(np.isfinite(signs)):
        raise ValueError("SJLT signs must be finite")


class RandomMask(VectorCompressor):
    """Keep ``k`` fixed random coordinates of a ``p``-vector (sorted ascending), no rescaling."""

    name = "mask"

    def __init__(self, p: int, k: int, seed: int = 0, *, indices: np.ndarray | None = None):
        self.p, self.k = check_sizes(p, k)
        self.seed = seed
        if indices is None:
            indices = sample_indices(p, k, derive_seed(seed, "mask"))
        self.indices = _validate_indices(np.asarray(indices), p, k)
        self._idx = _DeviceCache(self.indices)

    def spec_params(self) -> dict[str, object]:
        return {"k": self.k}

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        return g_BP.index_select(1, self._idx.get(g_BP.device))

    def dense_matrix(self) -> torch.Tensor:
        m = torch.zeros(self.k, self.p, dtype=torch.float64)
        m[torch.arange(self.k), torch.from_numpy(self.indices)] = 1.0
        return m


def _validate_indices(indices: np.ndarray, p: int, k: int) -> np.ndarray:
    if indices.ndim != 1 or indices.size != k:
        raise ValueError(f"indices must be a 1-D array of k={k} entries, got shape "
                         f"{indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    out = np.sort(indices.astype(np.int64))
    if out.size and (out[0] < 0 or out[-1] >= p):
        raise ValueError(f"indices must lie in [0, p={p})")
    if np.any(out[1:] == out[:-1]):
        raise ValueError("indices must be distinct")
    return out


class SJLT(VectorCompressor):
    """Sparse Johnson-Lindenstrauss transform ``R^p -> R^k`` with ``c`` nonzeros per column."""

    name = "sjlt"

    def __init__(self, p: int, k: int, c: int = 1, seed: int = 0):
        self.p = check_size("p", p)
        self.k = check_size("k", k)
        self.c = check_size("c", c)
        if c > k:
            raise ValueError(f"c={c} must be <= k={k} (each column needs c distinct rows)")
        self.seed = seed
        rows, signs = sjlt_tables(p, k, c, derive_seed(seed, "sjlt"))
        self.rows, self.signs = rows, signs
        self.csr = CsrTables(rows, signs, k)
        self.scale = 1.0 / math.sqrt(c)

    def spec_params(self) -> dict[str, object]:
        return {"k": self.k, "c": self.c}

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        if g_BP.shape[0] == 0:
            return g_BP.new_zeros(0, self.k)
        return kernels.sjlt(g_BP, *self.csr.on(g_BP.device), self.scale)

    def dense_matrix(self) -> torch.Tensor:
        m = torch.zeros(self.k, self.p, dtype=torch.float64)
        cols = torch.arange(self.p)
        for r in range(self.c):
            m.index_put_((torch.from_numpy(self.rows[r]), cols),
                         torch.from_numpy(self.signs[r]) * self.scale, accumulate=True)
        return m


class GraSS(VectorCompressor):
    """GraSS: ``SJLT_k o Mask_k'`` — sparsify to k' coordinates, then sparse-project to k."""

    name = "grass"

    def __init__(self, p: int, k: int, k_prime: int, c: int = 1, seed: int = 0):
        self.p = check_size("p", p)
        self.k = check_size("k", k)
        self.k_prime = check_size("k_prime", k_prime)
        if k_prime > p:
            raise ValueError(f"k_prime={k_prime} must be <= p={p}")
        if k_prime < k:
            raise ValueError(f"k_prime={k_prime} must be >= k={k}")
        self.c = c
        self.seed = seed
        self.mask = RandomMask(p, k_prime, derive_seed(seed, "grass"))
        self.sjlt = SJLT(k_prime, k, c, derive_seed(seed, "grass"))

    def spec_params(self) -> dict[str, object]:
        return {"k": self.k, "k_prime": self.k_prime, "c": self.c}

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        return self.sjlt.apply_unchecked(self.mask.apply_unchecked(g_BP))

    def dense_matrix(self) -> torch.Tensor:
        return self.sjlt.dense_matrix() @ self.mask.dense_matrix()
