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


BLOCK_NUMEL = {"cpu": 1 << 22, "other": 1 << 24}
"""Logits of more values than this go through the loss in blocks of rows of at most this many
(``_NextTokenNLL``), by device type. On the CPU 16 MiB of float32, below the 32 MiB from which
``host_heap.steady_heap`` has glibc map each request afresh: a block's temporaries then reuse
the heap, where 2^24 cost SmolLM2's step ~49,000 page faults (4 x 47 MiB). On a GPU the caching
allocator reuses any size, and larger blocks mean fewer kernel launches."""


def block_numel(device: torch.device) -> int:
    return BLOCK_NUMEL["cpu" if device.type == "cpu" else "other"]


def per_example_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                     reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per example, computed in float32 (float64 stays float64).

    Returns:
        ``(loss [B], n_targets [B])``. With ``mean``, an example with no target has loss 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dt = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    targets = labels_BT[:, 1:]
    if logits_BTV.numel() > block_numel(logits_BTV.device):  # never all upcast or copied
        nll_BT = _NextTokenNLL.apply(logits_BTV, targets, dt)
    else:  # one block anyway: torch's fused loss, fewer operator calls per step
        logits = logits_BTV[:, :-1].to(dt)
        nll_BT = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE, reduction="none").view(targets.shape)
    n = (targets != IGNORE).sum(1)
    loss = nll_BT.sum(1)
    if reduction == "mean":
        loss = loss / n.clamp_min(1)
    return loss, n


def loss_peak_bytes(tokens: int, vocab: int, logits_bytes: int) -> int:
    """Peak device memory of ``per_example_loss`` on ``tokens`` rows of logits (forward and
    backward, the logits themselves included), for ``grass-llm plan``. Blocked: the logits
    and their gradient in their own dtype, and two float32 blocks (a GPU's block size). Fused:
    a float32 copy of the shifted logits, the saved float32 log-softmax and its gradient."""
    n, block = tokens * vocab, BLOCK_NUMEL["other"]
    if n > block:
        return 2 * logits_bytes * n + 2 * 4 * block
    return n * max(logits_bytes + 8, 12)


def _row_blocks(B: int, T1: int, V: int, numel: int):
    """``(batch slice, position slice)`` blocks covering ``[B, T1]`` of at most ``numel`` logits
    each: whole sequences together while they fit, else pieces of one sequence."""
    rows = max(1, numel // V)
    if rows >= T1:
        per = rows // T1
        for b in range(0, B, per):
            yield slice(b, min(B, b + per)), slice(0, T1)
    else:
        for b in range(B):
            for t in range(0, T1, rows):
                yield slice(b, b + 1), slice(t, min(T1, t + rows))


class _NextTokenNLL(torch.autograd.Function):
    """``nll[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]]`` (0 where the target
    is ``IGNORE``), for the first ``T - 1`` positions, in ``dt``.

    The same numbers as ``F.cross_entropy`` on the flattened logits, without its memory: that
    path copies the logits (a ``[:, :-1]`` view cannot be flattened), upcasts them and saves a
    log-softmax of the same size for backward, 3-4 logits-sized float32 tensors at its peak
    (~4 GiB each for Llama-3's 128k vocabulary at 8 x 1024 tokens). Here the logits are
    upcast one block of rows at a time (``BLOCK_NUMEL``), only the logits themselves and the
    ``[B, T - 1]`` log-sum-exp are saved, and backward writes ``softmax - onehot`` block by
    block into one gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, targets, dt):
        B, T1 = targets.shape
        valid = targets != IGNORE
        index = targets.clamp_min(0).unsqueeze(-1)
        lse = torch.empty(B, T1, dtype=dt, device=logits.device)
        picked = torch.empty(B, T1, dtype=dt, device=logits.device)
        for bs, ts in _row_blocks(B, T1, logits.shape[-1], block_numel(logits.device)):
            x = logits[bs, ts].to(dt)
            lse[bs, ts] = torch.logsumexp(x, -1)
            picked[bs, ts] = x.gather(-1, index[bs, ts]).squeeze(-1)
        ctx.save_for_backward(logits, index, valid, lse)
        ctx.dt = dt
        return torch.where(valid, lse - picked, torch.zeros((), dtype=dt, device=lse.device))

    @staticmethod
    def backward(ctx, grad_nll):
        logits, index, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_nll.to(ctx.dt), torch.zeros((), dtype=ctx.dt,
                                                                device=lse.device))
        grad = torch.empty_like(logits)
        T1 = index.shape[1]
        grad[:, T1:] = 0  # the last position predicts nothing
        for bs, ts in _row_blocks(*index.shape[:2], logits.shape[-1],
                                  block_numel(logits.device)):
            gb = g[bs, ts].unsqueeze(-1)
            # in the gradient's own block when it has the compute dtype, else in a temporary
            p = grad[bs, ts] if logits.dtype == ctx.dt else None
            p = torch.sub(logits[bs, ts].to(ctx.dt), lse[bs, ts].unsqueeze(-1), out=p)
            p.exp_().mul_(gb).scatter_add_(-1, index[bs, ts], -gb)
            if logits.dtype != ctx.dt:
                grad[bs, ts] = p
        return grad, None, None


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
