"""Selective Mask (SM): a mask whose coordinates are learned from sample gradients.

The GraSS paper's procedure: one logit s_j per coordinate, soft mask ``m = sigmoid(s)``;
maximize the correlation between masked and unmasked gradient inner products,
``corr_q( <m*g_q, m*g_i>, <g_q, g_i> )`` averaged over test gradients q (correlation taken over
the training gradients i), minus an L1 penalty ``lambda * mean(m)``; finally keep the k' coordinates
with the largest logits. The learned indices are data, not a seed: a store records them.
"""

from __future__ import annotations

import numpy as np
import torch

from grass_llm.compress.base import check_size, compute_dtype
from grass_llm.compress.sparse import RandomMask


def _row_corr(a_QN: torch.Tensor, b_QN: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: ``[Q]``."""
    a = a_QN - a_QN.mean(dim=1, keepdim=True)
    b = b_QN - b_QN.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-30)


def masked_ip_correlation(indices: np.ndarray, grads_train: torch.Tensor,
                          grads_test: torch.Tensor) -> float:
    """Mean over test rows of corr(<g_q[S], g_i[S]>, <g_q, g_i>) for a hard mask S."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    tr, te = grads_train.double(), grads_test.double()
    full = te @ tr.T
    masked = te[:, idx] @ tr[:, idx].T
    return float(_row_corr(masked, full).mean())


class SelectiveMask(RandomMask):
    """A mask with given (or learned, see ``fit``) coordinates; behaves like ``RandomMask``."""

    name = "selective"

    def __init__(self, p: int, indices: np.ndarray | torch.Tensor, k: int | None = None):
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if k is not None and k != idx.size:
            raise ValueError(f"k={k} does not match the {idx.size} given indices")
        super().__init__(p, int(idx.size), seed=0, indices=idx)

    @classmethod
    def fit(cls, grads_train: torch.Tensor, grads_test: torch.Tensor, k_prime: int, *,
            l1: float = 1e-2, steps: int = 300, lr: float = 0.05) -> SelectiveMask:
        """Learn a k'-coordinate mask from sample gradients (the GraSS paper's SM).

        Args:
            grads_train: ``[N, P]`` sample training gradients (N >= 2).
            grads_test: ``[Q, P]`` sample test/query gradients.
            k_prime: how many coordinates to keep.
            l1: weight of the L1 penalty on the soft mask (``lambda * mean(sigmoid(s))``).
            steps: Adam steps on the full sample (deterministic on CPU).
            lr: Adam learning rate.

        Returns:
            A ``SelectiveMask`` keeping the top-k' logits; ``.logits`` holds the learned logits.
        """
        for name, g in (("grads_train", grads_train), ("grads_test", grads_test)):
            if not isinstance(g, torch.Tensor) or g.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor [n, p]")
            compute_dtype(g)
        if grads_train.shape[1] != grads_test.shape[1]:
            raise ValueError(f"grads_train has p={grads_train.shape[1]} but grads_test has "
                             f"p={grads_test.shape[1]}")
        if grads_train.shape[0] < 2:
            raise ValueError("grads_train needs at least 2 rows (a correlation over them)")
        p = grads_train.shape[1]
        check_size("k_prime", k_prime)
        if k_prime > p:
            raise ValueError(f"k_prime={k_prime} must be <= p={p}")
        check_size("steps", steps)

        tr = grads_train.detach().to(torch.float32)
        te = grads_test.detach().to(torch.float32)
        scale = tr.abs().max().clamp_min(1e-30)  # scale-free: the objective is a correlation
        tr, te = tr / scale, te / scale
        full = te @ tr.T
        logits = torch.zeros(p, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            m = torch.sigmoid(logits)
            masked = (te * m) @ (tr * m).T
            loss = -_row_corr(masked, full).mean() + l1 * m.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = logits.detach()
        order = torch.argsort(-final, stable=True)
        out = cls(p, order[:k_prime].numpy())
        out.logits = final
        return out
