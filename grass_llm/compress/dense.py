"""Dense and fast JL baselines on materialized gradients: Gaussian, Rademacher, FJLT.

All three satisfy ``E<Pg, Ph> = <g, h>``:
- ``Gaussian``: entries N(0, 1/k).
- ``Rademacher``: entries +-1/sqrt(k).
- ``FJLT``: ``P = (1/sqrt(k)) S H D`` with D random signs on p coordinates (zero-padded to
  n = 2^ceil(log2 p)), H the unnormalized n x n Walsh-Hadamard matrix and S k distinct rows
  sampled without replacement; O(p log p) per vector.

Entry (row i, column j) of a dense map comes from hash counter ``j * k + i``, so a block of
columns is a contiguous counter range: matrices too big to keep are regenerated block by block,
as TRAK-style projectors do, and the cost is then O(p k) generation per call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from grass_llm.compress._hash import (
    derive_seed,
    random_signs,
    sample_indices,
    standard_normal,
)
from grass_llm.compress.base import VectorCompressor, check_sizes
from grass_llm.compress.sparse import _DeviceCache

#: dense maps with at most this many entries are generated once and cached (256 MiB in float64)
CACHE_ENTRIES = 2**25
#: columns per block when a map is generated on the fly
_BLOCK_ENTRIES = 2**22


class _DenseJL(VectorCompressor):
    """A dense ``[k, p]`` map whose entries are a function of (key, counter)."""

    def __init__(self, p: int, k: int, seed: int = 0):
        self.p, self.k = check_sizes(p, k)
        self.seed = seed
        self._key = derive_seed(seed, self.name)
        self._cache = (_DeviceCache(self._block(0, p)) if k * p <= CACHE_ENTRIES else None)

    def spec_params(self) -> dict[str, object]:
        return {"k": self.k}

    def _entries(self, counters: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _block(self, j0: int, j1: int) -> np.ndarray:
        """Columns j0..j1 of the map, as a ``[k, j1 - j0]`` float64 array."""
        counters = np.arange(j0 * self.k, j1 * self.k, dtype=np.uint64)
        vals = self._entries(counters).reshape(j1 - j0, self.k).T
        return np.ascontiguousarray(vals / math.sqrt(self.k))

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            return g_BP @ self._cache.get(g_BP.device, g_BP.dtype).T
        out = g_BP.new_zeros(g_BP.shape[0], self.k)
        step = max(1, _BLOCK_ENTRIES // self.k)
        for j0 in range(0, self.p, step):
            j1 = min(self.p, j0 + step)
            blk = torch.from_numpy(self._block(j0, j1)).to(g_BP.device, g_BP.dtype)
            out.addmm_(g_BP[:, j0:j1], blk.T)
        return out

    def dense_matrix(self) -> torch.Tensor:
        return torch.from_numpy(self._block(0, self.p))


class Gaussian(_DenseJL):
    """Dense Gaussian projection, entries N(0, 1/k). O(p k) per vector."""

    name = "gaussian"

    def _entries(self, counters: np.ndarray) -> np.ndarray:
        return standard_normal(self._key, counters)


class Rademacher(_DenseJL):
    """Dense Rademacher projection, entries +-1/sqrt(k). O(p k) per vector."""

    name = "rademacher"

    def _entries(self, counters: np.ndarray) -> np.ndarray:
        return random_signs(self._key, counters)


def fwht(x_BN: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two)."""
    B, n = x_BN.shape
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    h = 1
    while h < n:
        x = x_BN.view(B, n // (2 * h), 2, h)
        a, b = x[:, :, 0], x[:, :, 1]
        x_BN = torch.stack((a + b, a - b), dim=2).view(B, n)
        h *= 2
    return x_BN


class FJLT(VectorCompressor):
    """Fast JL transform: random signs, Walsh-Hadamard, subsample k rows. O(p log p)."""

    name = "fjlt"

    def __init__(self, p: int, k: int, seed: int = 0):
        self.p, self.k = check_sizes(p, k)
        self.seed = seed
        self.n = 1 << max(0, (p - 1).bit_length())
        key = derive_seed(seed, "fjlt")
        self.signs = random_signs(derive_seed(key, "signs"), np.arange(p, dtype=np.uint64))
        self.rows = sample_indices(self.n, k, derive_seed(key, "rows"))
        self._signs = _DeviceCache(self.signs)
        self._rows = _DeviceCache(self.rows)

    def spec_params(self) -> dict[str, object]:
        return {"k": self.k}

    def apply_unchecked(self, g_BP: torch.Tensor) -> torch.Tensor:
        y = g_BP.new_zeros(g_BP.shape[0], self.n)
        y[:, : self.p] = g_BP * self._signs.get(g_BP.device, g_BP.dtype)
        y = fwht(y)
        return y.index_select(1, self._rows.get(g_BP.device)) / math.sqrt(self.k)

    def dense_matrix(self) -> torch.Tensor:
        # H[i, j] = (-1)^popcount(i & j), built directly (independently of fwht) for the tests.
        i = torch.from_numpy(self.rows)[:, None]
        j = torch.arange(self.p)[None, :]
        parity = torch.zeros(self.k, self.p, dtype=torch.int64)
        v = i & j
        while bool(v.any()):
            parity ^= v & 1
            v = v >> 1
        h = 1.0 - 2.0 * parity.to(torch.float64)
        return h * torch.from_numpy(self.signs)[None, :] / math.sqrt(self.k)
