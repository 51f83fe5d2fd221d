"""Selective Mask (SM): a mask whose coordinates are learned from sample gradients.

The GraSS paper's procedure: one logit s_j per coordinate, soft mask ``m = sigmoid(s)``;
maximize the correlation between masked and unmasked gradient inner products,
``corr_q( <m*g_q, m*g_i>, <g_q, g_i> )`` averaged over test gradients q (correlation taken over
the training gradients i), minus an L1 penalty ``lambda * mean(m)``; finally keep the k' coordinates
with the largest logits. The learned indices are data, not a seed: a store records them.

``fit_factorized_mask`` is the same objective for FactGraSS's product masks (S_out x S_in) of
one Linear layer; ``grass-llm fit-mask`` runs it per layer and writes a mask file
(``mask_file``) that the ``factgrass`` spec names with ``mask=PATH``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
            l1: float = 1e-2, steps: int = 300, lr: float = 0.05,
            seed: int = 0) -> SelectiveMask:
        """Learn a k'-coordinate mask from sample gradients (the GraSS paper's SM).

        Args:
            grads_train: ``[N, P]`` sample training gradients (N >= 2).
            grads_test: ``[Q, P]`` sample test/query gradients.
            k_prime: how many coordinates to keep.
            l1: weight of the L1 penalty on the soft mask (``lambda * mean(sigmoid(s))``).
            steps: Adam steps on the full sample (deterministic on CPU).
            lr: Adam learning rate.
            seed: seed of the initial logits' noise.

        Returns:
            A ``SelectiveMask`` keeping the best top-k' hard mask met while optimising (see
            ``fit_factorized_mask``); ``.logits`` holds the final logits.
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

        # A vector mask is the product mask of a [1, p] "layer" with its one output kept, so
        # the factorized fit runs it: seeded noise to start from (at a uniform mask the
        # correlation is 1 and its gradient exactly 0) and the best hard mask on the path.
        fit = fit_factorized_mask(grads_train[:, None, :], grads_test[:, None, :], k_prime, 1,
                                  l1=l1, steps=steps, lr=lr, seed=seed)
        out = cls(p, fit.idx_in)
        out.logits = fit.logits_in
        return out


# ------------------------------------------------------------------ the factorized (FactGraSS) SM
def _product_gather(g_NOI: torch.Tensor, idx_out: torch.Tensor, idx_in: torch.Tensor
                    ) -> torch.Tensor:
    """``G[:, S_out][:, :, S_in]`` flattened: ``[N, O, I] -> [N, k_out * k_in]`` (row-major, so
    it is ``vec(G)[S_out x S_in]``, FactGraSS's vec(M))."""
    return g_NOI.index_select(1, idx_out).index_select(2, idx_in).reshape(g_NOI.shape[0], -1)


def factorized_mask_correlation(g_train_NOI: torch.Tensor, g_target_QOI: torch.Tensor,
                                idx_in: np.ndarray, idx_out: np.ndarray) -> float:
    """The hard product mask's objective value (float64): the mean over target rows q of
    ``corr_i(<G_q[S_out, S_in], G_i[S_out, S_in]>, <G_q, G_i>)``, Pearson over train rows i.

    Args:
        g_train_NOI: ``[N, O, I]`` per-example gradients of one layer (I = d_in (+1 bias)).
        g_target_QOI: ``[Q, O, I]`` target (query-like) gradients of the same layer.
        idx_in: S_in, indices into I. idx_out: S_out, indices into O.
    """
    tr, te = g_train_NOI.double(), g_target_QOI.double()
    full = te.reshape(te.shape[0], -1) @ tr.reshape(tr.shape[0], -1).T
    i_in = torch.as_tensor(np.asarray(idx_in), dtype=torch.long, device=tr.device)
    i_out = torch.as_tensor(np.asarray(idx_out), dtype=torch.long, device=tr.device)
    masked = _product_gather(te, i_out, i_in) @ _product_gather(tr, i_out, i_in).T
    return float(_row_corr(masked, full).mean())


@dataclass
class FactorizedMaskFit:
    """A learned FactGraSS mask for one layer (see ``fit_factorized_mask``).

    Attributes:
        idx_in: ``[k_in]`` sorted S_in (the bias column, when there is one, is index d_in).
        idx_out: ``[k_out]`` sorted S_out.
        objective: the hard masks' value of the objective on the calibration rows
            (``factorized_mask_correlation``, float64).
        step: the optimizer step whose top-k logits gave these masks (0 = before any step).
        logits_in, logits_out: the final logits ``[I]``, ``[O]`` (float32).
    """

    idx_in: np.ndarray
    idx_out: np.ndarray
    objective: float
    step: int
    logits_in: torch.Tensor = field(repr=False)
    logits_out: torch.Tensor = field(repr=False)


def _check_grads(g_train_NOI: torch.Tensor, g_target_QOI: torch.Tensor, k_in: int,
                 k_out: int) -> None:
    for name, g in (("g_train", g_train_NOI), ("g_target", g_target_QOI)):
        if not isinstance(g, torch.Tensor) or g.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [n, d_out, d_in], got "
                             f"{getattr(g, 'shape', type(g).__name__)}")
        compute_dtype(g)
    if g_train_NOI.shape[1:] != g_target_QOI.shape[1:]:
        raise ValueError(f"g_train is [n, {', '.join(map(str, g_train_NOI.shape[1:]))}] but "
                         f"g_target is [q, {', '.join(map(str, g_target_QOI.shape[1:]))}]")
    if g_train_NOI.shape[0] < 3:
        raise ValueError("g_train needs at least 3 rows (a correlation over them)")
    if g_target_QOI.shape[0] < 1:
        raise ValueError("g_target needs at least 1 row")
    O, I = g_train_NOI.shape[1:]
    for name, k, limit in (("k_in", k_in, I), ("k_out", k_out, O)):
        check_size(name, k)
        if k > limit:
            raise ValueError(f"{name}={k} must be <= the layer's {limit}")


def fit_factorized_mask(g_train_NOI: torch.Tensor, g_target_QOI: torch.Tensor, k_in: int,
                        k_out: int, *, l1: float = 1e-2, steps: int = 300, lr: float = 0.01,
                        init_std: float = 0.01, seed: int = 0) -> FactorizedMaskFit:
    """Learn FactGraSS's input and output masks for one Linear layer (the GraSS paper's SM).

    FactGraSS masks ``G = sum_t delta_t x_t^T`` (``[O, I]``) with a *product* mask: rows S_out
    of delta and columns S_in of x, which is the flat mask ``S_out x S_in`` on vec(G). So the
    paper's selective-mask objective is optimised over product masks: one logit per input
    coordinate ``s_in [I]`` and per output coordinate ``s_out [O]``, soft masks
    ``m_in = sigmoid(s_in)``, ``m_out = sigmoid(s_out)``, which mask the factors themselves
    (``delta_t * m_out``, ``x_t * m_in``), i.e. ``G -> diag(m_out) G diag(m_in)``. Maximised:

        J(s) = mean_q corr_i( <diag(m_out) G_q diag(m_in), diag(m_out) G_i diag(m_in)>,
                              <G_q, G_i> )  -  l1 * (mean(m_in) + mean(m_out))

    with Pearson correlation over the training rows i, for each target row q: the masked inner
    products of train and target gradients must rank and scale like the full ones. Adam on
    the full calibration sample (deterministic), logits initialised to ``N(0, init_std^2)``
    (seeded): at an exactly uniform mask the correlation is 1 and its gradient 0, so the small
    noise is what starts the search, as in the authors' code.

    The relaxation has no sparse optimum of its own (any uniform mask has correlation 1), so
    the result is read off the optimisation path: after every step the top-k_in / top-k_out
    logits give a hard mask, scored by the objective without the penalty
    (``factorized_mask_correlation``); the best hard mask seen is returned. The SJLT stage
    after the mask is not part of the objective (it preserves inner products in expectation).

    Args:
        g_train_NOI: ``[N, O, I]`` calibration training gradients of the layer (N >= 3).
        g_target_QOI: ``[Q, O, I]`` calibration target gradients (queries, or any examples
            whose attributions matter).
        k_in, k_out: mask sizes (FactGraSS's ``k_in``, ``k_out``).
        l1: weight of the sparsity penalty on the soft masks.
        steps: Adam steps.
        lr: Adam learning rate (on the logits).
        init_std: standard deviation of the initial logits.
        seed: seed of the initial logits.

    Returns:
        The hard masks, their objective value, the step they came from, the final logits.
    """
    _check_grads(g_train_NOI, g_target_QOI, k_in, k_out)
    check_size("steps", steps, minimum=0)
    N, O, I = g_train_NOI.shape
    if (k_in, k_out) == (I, O):
        steps = 0  # the mask keeps everything: nothing to learn
    tr = g_train_NOI.detach().to(torch.float32).reshape(N, -1)
    te = g_target_QOI.detach().to(torch.float32).reshape(g_target_QOI.shape[0], -1)
    scale = tr.abs().max().clamp_min(1e-30)  # scale-free: the objective is a correlation
    tr, te = tr / scale, te / scale
    full = te @ tr.T
    gen = torch.Generator().manual_seed(seed % 2**63)  # on the CPU: the same on any device
    s_in = (torch.randn(I, generator=gen) * init_std).to(tr.device).requires_grad_(True)
    s_out = (torch.randn(O, generator=gen) * init_std).to(tr.device).requires_grad_(True)
    opt = torch.optim.Adam([s_in, s_out], lr=lr)
    tr3, te3 = tr.view(N, O, I), te.view(-1, O, I)

    def hard() -> tuple[float, torch.Tensor, torch.Tensor]:
        """The top-k logits' hard masks and their objective (float32, for the selection)."""
        i_in = torch.sort(torch.argsort(-s_in.detach(), stable=True)[:k_in]).values
        i_out = torch.sort(torch.argsort(-s_out.detach(), stable=True)[:k_out]).values
        masked = _product_gather(te3, i_out, i_in) @ _product_gather(tr3, i_out, i_in).T
        return float(_row_corr(masked, full).mean()), i_in, i_out

    best = (*hard(), 0)
    for step in range(1, steps + 1):
        m_in, m_out = torch.sigmoid(s_in), torch.sigmoid(s_out)
        w = (m_out.square()[:, None] * m_in.square()[None, :]).reshape(-1)
        loss = -_row_corr((te * w) @ tr.T, full).mean() + l1 * (m_in.mean() + m_out.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        value, i_in, i_out = hard()
        if value > best[0]:
            best = (value, i_in, i_out, step)
    _, i_in, i_out, step = best
    idx_in, idx_out = i_in.cpu().numpy().astype(np.int64), i_out.cpu().numpy().astype(np.int64)
    return FactorizedMaskFit(idx_in, idx_out,
                             factorized_mask_correlation(g_train_NOI, g_target_QOI, idx_in,
                                                         idx_out),
                             step, s_in.detach().cpu().clone(), s_out.detach().cpu().clone())
