"""Normalized scores: what each ``normalize`` option computes, and the row norms it needs.

Notation: ``H = diag_l(F_l + lambda_l I)`` (the damped block-diagonal Fisher), ``g_i`` the
stored row of training example i and ``q`` a query's row, each the concatenation of its layer
blocks (``g_i = [g_i1, ..., g_iL]``), ``q~ = H^-1 q`` the preconditioned query. Every norm is
the Euclidean norm of the whole concatenated row, ``||g_i|| = sqrt(sum_l ||g_il||^2)``: the
score is one inner product over all layers, so its cosine is one too (per-layer norms would
weight each layer equally whatever its share of the gradient).

- ``none``:       ``s(q, i) = q~^T g_i`` (the influence score, DESIGN.md).
- ``cosine``:     ``s(q, i) = q~^T g_i / (||q~|| ||g_i||)``: the preconditioned query and the
  stored training row, each unit-normalized; in [-1, 1].
- ``train-unit``: ``s(q, i) = q~^T g_i / ||g_i||``: only the training row is normalized.

Which side of the preconditioner: the query is normalized *after* ``H^-1`` (``||q~||``), the
training row as stored, before any preconditioning (``||g_i||``, the compressed gradient's own
norm, computed from the rows the pass reads anyway: no extra read, no solve). For one query the
ranking of the training examples is the same under ``cosine`` and ``train-unit`` (they differ by
the positive factor ``1 / ||q~||``); they differ where queries are compared or added: the score
matrix, and valuation, where ``cosine`` gives every target the same weight.

The papers, as we read them:

- LESS (Xia et al., 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning")
  scores a training example by the cosine between its (Adam-preconditioned, LoRA, randomly
  projected) gradient feature and each target example's gradient, because plain inner products
  favour short sequences, whose gradient norms are large; valuation there averages the
  cosines over a task's targets. Our ``cosine`` is that normalization, with the Fisher on the
  query side; ``value --normalize cosine`` sums each target's cosine.
- TrackStar (Chang et al., 2024, "Scalable Influence and Fact Tracing for Large Language Model
  Pretraining") unit-normalizes both encodings after its preconditioner (optimizer second
  moments, random projection, then ``R^-1/2`` of a gradient autocorrelation matrix ``R``), so
  its score is a cosine in the metric of ``R^-1``; for ranking the training set against one
  query only the training side's normalization matters, which ``train-unit`` keeps.
  Difference: TrackStar's training norm is ``||R^-1/2 g_i||``; ours is ``||g_i||``. The
  metric norm ``||L_l^-1 g_il||`` would cost a triangular solve per row and layer in every
  pass (the cost of ``self-influence``), where ``||g_i||`` costs one pass over the row.

Zero rows (a row stored as zeros because it was not finite, see ``row_flags``) have no
direction: their normalized score is 0.

Self-influence (``s(i, i) = g_i^T H^-1 g_i``): ``train-unit`` normalizes the training row,
which is both sides of ``s(i, i)``: ``g_i^T H^-1 g_i / ||g_i||^2``, a Rayleigh quotient of
``H^-1`` in [1 / lambda_max(H), 1 / lambda_min(H)]: how far the example's gradient *direction*
points into directions the rest of the data rarely takes, whatever its magnitude. ``cosine``
is refused: the cosine of a row with itself is 1 for every example in the metric the score
uses (``<u, v> = u^T H^-1 v``), so it ranks nothing, and the per-side variant
``cos(H^-1 g_i, g_i)`` measures how much the preconditioner turns a row, not its influence.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

NORMALIZATIONS = ("none", "cosine", "train-unit")
SELF_INFLUENCE_NORMALIZATIONS = ("none", "train-unit")


def check_normalize(normalize: str, allowed: tuple[str, ...] = NORMALIZATIONS) -> str:
    """``normalize`` if it is one of ``allowed``, else a ValueError saying what is."""
    if normalize not in allowed:
        if normalize == "cosine" and "cosine" not in allowed:
            raise ValueError("self-influence has no cosine variant: the cosine of an example "
                             "with itself is 1 for every example, so it ranks nothing; use "
                             "--normalize train-unit for self-influence independent of the "
                             "gradient's magnitude (see docs/influence.md)")
        raise ValueError(f"normalize must be one of {list(allowed)}, got {normalize!r}")
    return normalize


def row_norms(rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Norms of rows concatenated over layers: ``sqrt(sum_l ||rows[l][j]||^2)``, ``[Q]``
    float64 (on the rows' device)."""
    total = None
    for r in rows.values():
        sq = r.double().square().sum(1)
        total = sq if total is None else total + sq
    return total.sqrt()


def inverse(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms`` with 0 where a norm is 0 (a zero row's normalized score is 0)."""
    norms = norms.double()
    return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)


def scale_rows(rows: Mapping[str, torch.Tensor], scale: torch.Tensor | np.ndarray
               ) -> dict[str, torch.Tensor]:
    """Every layer's rows times ``scale`` ``[Q]`` (float64)."""
    s = torch.as_tensor(scale, dtype=torch.float64)
    return {k: v.double() * s.to(v.device)[:, None] for k, v in rows.items()}
