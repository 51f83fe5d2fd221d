"""Pure-torch reference of the fused kernels: the executable spec, the fallback and the oracle.

Shape legend: B examples, T tokens, I = d_in, O = d_out, KI / KO kept columns, KP = KO * KI,
K outputs, P vector length, C = SJLT nonzeros per column.

Conventions shared with csrc/ (see csrc/grass_kernels.h):

- ``idx_in`` / ``idx_out`` are int64 column indices; an ``idx_in`` entry equal to ``I`` selects
  a constant 1 (the bias column), so the bias is never appended to x in memory.
- An SJLT is passed as the CSR of its transpose (``indptr [K+1]``, ``src [nnz]``, ``sgn [nnz]``
  float32): ``out[j] = scale * sum_{e in [indptr[j], indptr[j+1])} sgn[e] * v[src[e]]``.
- float16 / bfloat16 / float32 accumulate and return float32; float64 stays float64.
"""

from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gather_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[..., idx]``; a 2-D gather along dim 1 is several times faster on CPU than on dim 2."""
    flat = t.reshape(-1, t.shape[-1]).index_select(1, idx)
    return flat.view(*t.shape[:-1], idx.numel())


def gather_columns(x_BTI: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[..., idx]`` in the accumulation dtype, an index equal to ``I`` reading as 1."""
    width = x_BTI.shape[-1]
    bias = idx == width
    if bool(bias.any()):
        out = gather_last(x_BTI, idx.clamp(max=width - 1)).to(acc_dtype(x_BTI))
        out[..., bias] = 1.0
        return out
    return gather_last(x_BTI, idx).to(acc_dtype(x_BTI))


def csr_row_ids(indptr: torch.Tensor) -> torch.Tensor:
    """The output row of every CSR entry: ``[nnz]``."""
    counts = indptr[1:] - indptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)


def sjlt(g_BP: torch.Tensor, indptr: torch.Tensor, src: torch.Tensor, sgn: torch.Tensor,
         scale: float) -> torch.Tensor:
    """SJLT of the last dimension: ``[..., P] -> [..., K]``."""
    acc = acc_dtype(g_BP)
    k = indptr.numel() - 1
    vals = g_BP.to(acc).index_select(-1, src) * sgn.to(acc)
    out = g_BP.new_zeros(*g_BP.shape[:-1], k, dtype=acc)
    out.index_add_(-1, csr_row_ids(indptr), vals)
    if scale != 1.0:
        out.mul_(scale)
    return out


def sjlt_t(y_BK: torch.Tensor, rows: torch.Tensor, signs: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Transpose SJLT ``[B, K] -> [B, P]``: ``out[b, s] = scale sum_r signs[r, s] y[b, rows[r, s]]``."""
    acc = acc_dtype(y_BK)
    y = y_BK.to(acc)
    out = y.index_select(1, rows[0]) * signs[0].to(acc)
    for r in range(1, rows.shape[0]):
        out += y.index_select(1, rows[r]) * signs[r].to(acc)
    if scale != 1.0:
        out.mul_(scale)
    return out


def factgrass(x_BTI: torch.Tensor, delta_BTO: torch.Tensor, idx_in: torch.Tensor,
              idx_out: torch.Tensor, indptr: torch.Tensor, src: torch.Tensor, sgn: torch.Tensor,
              scale: float, per_token: bool) -> torch.Tensor:
    """FactGraSS: ``SJLT(vec(sum_t delta_t[idx_out] x_t[idx_in]^T))``, ``[B, K]`` or ``[B, T, K]``.

    ``per_token`` keeps one row per token (each token's own rank-1 term) instead of the sum.
    """
    xs = gather_columns(x_BTI, idx_in)
    ds = gather_last(delta_BTO, idx_out).to(xs.dtype)
    B, T = xs.shape[:2]
    if per_token:
        m = (ds.unsqueeze(-1) * xs.unsqueeze(-2)).reshape(B, T, -1)
    else:
        m = torch.bmm(ds.transpose(1, 2), xs).reshape(B, -1)
    return sjlt(m, indptr, src, sgn, scale)
