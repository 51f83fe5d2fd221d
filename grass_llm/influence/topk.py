"""Running top-k of streamed score chunks, and the merge of several ranks' top-k lists.

Order everywhere (both backends, the merge): higher score first, equal scores by lower row
first; unfilled slots (fewer rows than k) have row -1 and score -inf, last. The result therefore
does not depend on the backend, the chunk order within a rank, or the number of ranks.
Shapes: Q queries, R rows of a chunk, K top-k size.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba

    @numba.njit(cache=True)
    def _worst(vals, idx, q, K):  # pragma: no cover - compiled
        """The slot to evict: the lowest score, and of equal lowest scores the highest row."""
        w = 0
        for j in range(1, K):
            if vals[q, j] < vals[q, w] or (vals[q, j] == vals[q, w] and idx[q, j] > idx[q, w]):
                w = j
        return w

    @numba.njit(parallel=True, cache=True)
    def _merge_topk_numba(scores, offset, vals, idx):  # pragma: no cover - compiled
        Q, R = scores.shape
        K = vals.shape[1]
        for q in numba.prange(Q):
            w = _worst(vals, idx, q, K)
            for r in range(R):
                # strictly better only: rows arrive in increasing order, so a tie keeps the
                # lower row already held
                if scores[q, r] > vals[q, w]:
                    vals[q, w] = scores[q, r]
                    idx[q, w] = offset + r
                    w = _worst(vals, idx, q, K)

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

BACKENDS = ("auto", "numba", "torch")


class TopK:
    """Running top-k of every query row over score chunks given in increasing row order.

    Args:
        n_queries: Q.
        k: kept per query (>= 1).
        backend: ``"numba"`` (CPU, a compiled merge), ``"torch"`` (any device: a stable sort
            of [kept, chunk] per update) or ``"auto"`` (numba for CPU when installed).
        device: where the torch backend keeps its state and takes its scores.
    """

    def __init__(self, n_queries: int, k: int, backend: str = "auto",
                 device: torch.device | str = "cpu"):
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got {k}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        if backend == "auto":
            backend = "numba" if HAVE_NUMBA and self.device.type == "cpu" else "torch"
        if backend == "numba" and not HAVE_NUMBA:
            raise ValueError("backend 'numba' asked for, but numba is not installed")
        self.k, self.backend = k, backend
        if backend == "numba":
            self.vals = np.full((n_queries, k), -np.inf, dtype=np.float64)
            self.idx = np.full((n_queries, k), -1, dtype=np.int64)
        else:  # kept sorted: score descending, row ascending among equal scores
            self.vals = torch.full((n_queries, k), -torch.inf, dtype=torch.float64,
                                   device=self.device)
            self.idx = torch.full((n_queries, k), -1, dtype=torch.int64, device=self.device)
        self._next_row = 0

    def update(self, scores_QR, offset: int) -> None:
        """Merge the scores of rows ``offset ... offset + R - 1`` (numpy array or tensor)."""
        if offset < self._next_row:
            raise ValueError(f"rows must arrive in increasing order (got row {offset} after "
                             f"{self._next_row - 1})")
        R = scores_QR.shape[1]
        self._next_row = offset + R
        if self.backend == "numba":
            if isinstance(scores_QR, torch.Tensor):
                scores_QR = scores_QR.detach().cpu().numpy()
            _merge_topk_numba(np.ascontiguousarray(scores_QR, dtype=np.float64), offset,
                              self.vals, self.idx)
            return
        s = torch.as_tensor(scores_QR).to(self.device, torch.float64)
        rows = torch.arange(offset, offset + R, device=self.device).expand(s.shape[0], R)
        both_v = torch.cat([self.vals, s], dim=1)
        both_i = torch.cat([self.idx, rows], dim=1)
        # stable: equal scores keep their order in [kept (lower rows, row-sorted), chunk rows]
        order = torch.sort(both_v, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.vals = both_v.gather(1, order)
        self.idx = both_i.gather(1, order)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values [Q, K] float64, rows [Q, K] int64)``, best first (see module order)."""
        vals, idx = self.vals, self.idx
        if isinstance(vals, torch.Tensor):
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        return _ordered(vals, idx, self.k)


def _ordered(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if vals.size == 0:
        return vals[:, :k], idx[:, :k]
    order = np.lexsort((idx, -vals), axis=1)[:, :k]
    return (np.ascontiguousarray(np.take_along_axis(vals, order, 1)),
            np.ascontiguousarray(np.take_along_axis(idx, order, 1)))


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of the union of several disjoint-row top-k lists (e.g. one per rank): equal
    to the top-k of one pass over all their rows."""
    vals = np.concatenate([p[0] for p in parts], axis=1)
    idx = np.concatenate([p[1] for p in parts], axis=1)
    return _ordered(vals, idx, k)
