"""Per-example losses and the per-token expansion (DESIGN.md, contract).

Labels follow the Hugging Face convention: ``labels[b, t]`` is the token that position t must
predict from positions < t (the model's logits at t - 1), ``-100`` = not a target (prompt tokens,
padding). An example's loss is the **sum** of its targets' next-token NLL (``mean`` divides by
their count). Shapes: B = batch, T = sequence, V = vocabulary, N = expanded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
REDUCTIONS = ("sum", "mean")


def target_mask(labels_BT: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: which label positions are targets (position 0 never is: no predictor)."""
    mask = labels_BT != IGNORE
    mask[:, 0] = False
    return mask


def per_example_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                     reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per example, computed in float32 (float64 stays float64).

    Returns:
        ``(loss [B], n_targets [B])``. With ``mean``, an example with no target has loss 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dt = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    logits = logits_BTV[:, :-1].to(dt)
    targets = labels_BT[:, 1:]
    nll_BT = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(targets.shape)
    n = (targets != IGNORE).sum(1)
    loss = nll_BT.sum(1)
    if reduction == "mean":
        loss = loss / n.clamp_min(1)
    return loss, n


@dataclass
class TokenExpansion:
    """One row per target token: the example repeated, with only that token as a target."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], exactly one target per row
    example: torch.Tensor  # [N] index of the source example
    position: torch.Tensor  # [N] label position t of the target within its sequence
    offsets: torch.Tensor  # [B + 1] rows of example b are offsets[b]:offsets[b + 1]


def expand_per_token(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> TokenExpansion:
    """Expand a batch so that each row's loss is a single target token's loss.

    The sum of the rows' per-example gradients is the example's gradient (sum reduction), which
    is how token-level attribution gets the exact gradient of each token's loss alone: attention
    lets every later token's loss flow back into earlier positions, so no single backward pass
    can separate them.
    """
    mask = target_mask(labels)
    example, position = mask.nonzero(as_tuple=True)
    new_labels = torch.full_like(labels[example], IGNORE)
    rows = torch.arange(example.numel(), device=labels.device)
    new_labels[rows, position] = labels[example, position]
    counts = mask.sum(1)
    offsets = torch.zeros(labels.shape[0] + 1, dtype=torch.long, device=labels.device)
    offsets[1:] = counts.cumsum(0)
    return TokenExpansion(input_ids[example], attention_mask[example], new_labels, example,
                          position, offsets)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding (0 at each sequence's first real token), for left padding."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)
