"""The part of a factorized map that one tensor-parallel rank computes (DESIGN.md, TP contract).

A rank holding a column shard of W (rows ``[o0, o1)`` of the output: colwise parallel) sees the
full x and its slice of delta; a rank holding a row shard (columns ``[i0, i1)``: rowwise parallel)
sees its slice of x and the full delta. Masks, SJLT buckets and projections are defined on
*global* indices, so:

- FactGraSS: each rank forms the block of M whose mask rows/columns it owns and scatters it
  through the SJLT buckets of those global positions; the ranks' partial [B, k] vectors **sum**
  to the unsharded result.
- LoGra: ``P_in x = sum over ranks of P_in[:, shard] x_shard`` (rowwise) or the same for
  ``P_out delta`` (colwise): the projected features must be summed over the group *before* the
  outer product (``reduce_input`` / ``reduce_output`` say which); the result is then complete
  on every rank.

A replicated bias (rowwise layers) is counted by one rank only (``own_bias``).
"""

from __future__ import annotations

import numpy as np
import torch

from grass_llm.compress.base import compute_dtype, reduce_unfused
from grass_llm.compress.factorized import FactGraSS, LoGra, _call, _gather_last
from grass_llm.compress.sparse import CsrTables, _DeviceCache


def _check_range(name: str, rng: tuple[int, int], size: int) -> tuple[int, int]:
    a, b = int(rng[0]), int(rng[1])
    if not 0 <= a <= b <= size:
        raise ValueError(f"{name}={rng} must satisfy 0 <= start <= stop <= {size}")
    return a, b


class FactGraSSShard:
    """One rank's share of a ``FactGraSS`` map; its outputs sum to the full map's over ranks."""

    partial = True  # results must be summed over the tensor-parallel group

    def __init__(self, full: FactGraSS, out_range: tuple[int, int], in_range: tuple[int, int],
                 own_bias: bool = True):
        o0, o1 = _check_range("out_range", out_range, full.d_out)
        i0, i1 = _check_range("in_range", in_range, full.d_in)
        self.full, self.k = full, full.k
        self.d_in_local, self.d_out_local = i1 - i0, o1 - o0
        a_sel = np.nonzero((full.idx_out >= o0) & (full.idx_out < o1))[0]
        b_sel = np.nonzero((full.idx_in >= i0) & (full.idx_in < i1))[0]
        self.with_bias = bool(own_bias and full.bias and full.idx_in[-1] == full.d_in)
        if self.with_bias:  # sorted mask: the bias column d_in is the last position
            b_sel = np.append(b_sel, full.k_in - 1)
        self.n_out, self.n_in = a_sel.size, b_sel.size
        self._out = _DeviceCache(full.idx_out[a_sel] - o0)
        self._in = _DeviceCache(full.idx_in[b_sel[: self.n_in - int(self.with_bias)]] - i0)
        # The owned block of M, flattened, goes through the SJLT columns of its global
        # positions: a sub-table, in the CSR form the kernel takes.
        flat = (a_sel[:, None] * full.k_in + b_sel[None, :]).reshape(-1)
        self._csr = CsrTables(full.sjlt.rows[:, flat], full.sjlt.signs[:, flat], full.k)
        self._all_in = _DeviceCache(np.arange(self.n_in, dtype=np.int64))
        self._all_out = _DeviceCache(np.arange(self.n_out, dtype=np.int64))
        self._calls: dict = {}

    def input_features(self, x_BTI: torch.Tensor) -> torch.Tensor:
        """Local x ``[B, T, i1 - i0]`` -> the owned mask columns ``[B, T, n_in]``."""
        xs = _gather_last(x_BTI, self._in.get(x_BTI.device)).to(compute_dtype(x_BTI))
        if self.with_bias:
            xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)
        return xs

    def output_features(self, delta_BTO: torch.Tensor) -> torch.Tensor:
        """Local delta ``[B, T, o1 - o0]`` -> the owned mask rows ``[B, T, n_out]``."""
        return _gather_last(delta_BTO, self._out.get(delta_BTO.device)).to(
            compute_dtype(delta_BTO))

    def _fused(self, xf, d, idx_out: _DeviceCache, per_token: bool) -> torch.Tensor:
        if self.n_out == 0 or self.n_in == 0 or xf.shape[0] == 0:
            return xf.new_zeros(*xf.shape[:2 if per_token else 1], self.k)
        return _call(self._calls, xf, d, self._all_in, idx_out, self._csr,
                     self.full.sjlt.scale, per_token)

    def reduce(self, xf_BTK: torch.Tensor, delta_BTO: torch.Tensor,
               per_token: bool = False) -> torch.Tensor:
        """This rank's partial compressed vectors from features and its raw delta slice."""
        return self._fused(xf_BTK, delta_BTO, self._out, per_token)

    def combine(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        """This rank's partial compressed vectors ``[B, k]``."""
        return self._fused(xf_BTK, df_BTK, self._all_out, False)

    def combine_per_token(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return self._fused(xf_BTK, df_BTK, self._all_out, True)


class LoGraShard:
    """One rank's share of a ``LoGra`` map. Its projected features are partial sums on the
    sharded side: the caller all-reduces them (``reduce_input`` / ``reduce_output``) before
    ``combine``, which then returns the complete result on every rank."""

    partial = False

    def __init__(self, full: LoGra, out_range: tuple[int, int], in_range: tuple[int, int],
                 own_bias: bool = True):
        o0, o1 = _check_range("out_range", out_range, full.d_out)
        i0, i1 = _check_range("in_range", in_range, full.d_in)
        self.full, self.k = full, full.k
        self.reduce_input = (i0, i1) != (0, full.d_in)
        self.reduce_output = (o0, o1) != (0, full.d_out)
        if self.reduce_input and self.reduce_output:
            raise ValueError("a layer cannot be sharded on both dimensions")
        p_in = full.proj_in.dense_matrix()  # [k_in, d_in (+1)]
        cols = list(range(i0, i1)) + ([full.d_in] if full.bias and own_bias else [])
        self.with_bias = bool(full.bias and own_bias)
        self._p_in = _DeviceCache(np.ascontiguousarray(p_in[:, cols].numpy()))
        self._p_out = _DeviceCache(np.ascontiguousarray(
            full.proj_out.dense_matrix()[:, o0:o1].numpy()))

    def input_features(self, x_BTI: torch.Tensor) -> torch.Tensor:
        x = x_BTI.to(compute_dtype(x_BTI))
        if self.with_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        p = self._p_in.get(x.device, x.dtype)
        return (x.reshape(-1, x.shape[-1]) @ p.T).view(*x.shape[:-1], p.shape[0])

    def output_features(self, delta_BTO: torch.Tensor) -> torch.Tensor:
        d = delta_BTO.to(compute_dtype(delta_BTO))
        p = self._p_out.get(d.device, d.dtype)
        return (d.reshape(-1, d.shape[-1]) @ p.T).view(*d.shape[:-1], p.shape[0])

    def combine(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return self.full.combine(xf_BTK, df_BTK)

    def combine_per_token(self, xf_BTK: torch.Tensor, df_BTK: torch.Tensor) -> torch.Tensor:
        return self.full.combine_per_token(xf_BTK, df_BTK)

    def reduce(self, xf_BTK: torch.Tensor, delta_BTO: torch.Tensor,
               per_token: bool = False) -> torch.Tensor:
        return reduce_unfused(self, xf_BTK, delta_BTO, per_token)


def shard_compressor(full, out_range: tuple[int, int], in_range: tuple[int, int],
                     own_bias: bool = True):
    """The shard view of a factorized compressor for one tensor-parallel rank."""
    if isinstance(full, FactGraSS):
        return FactGraSSShard(full, out_range, in_range, own_bias)
    if isinstance(full, LoGra):
        return LoGraShard(full, out_range, in_range, own_bias)
    raise ValueError(f"tensor parallelism supports the factgrass and logra compressors, not "
                     f"{full.name!r} (vector compressors need the whole gradient)")


