"""A batch in and out of the capture: input checks, moving left padding to the right, and
the compressed gradients it gives (``CaptureOutput``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grass_llm.capture.loss import IGNORE


@dataclass
class CaptureOutput:
    """Compressed gradients of one batch.

    Attributes:
        grads: ``{layer: [B, K]}`` per example, or ``{layer: [N, K]}`` rows in token mode.
        loss: ``[B]`` each example's loss (with the chosen reduction).
        n_targets: ``[B]`` target tokens per example.
        offsets: token modes: ``[B + 1]``, rows of example b are ``offsets[b]:offsets[b+1]``.
        positions: token modes: ``[N]`` sequence position of each row's token (its label
            position in ``loss`` mode; its input position in ``position`` mode).
        token_rows: ``position`` mode: the ``[N, sum k]`` buffer (layers in capture order) that
            ``grads`` are column views of, written per layer during backward (``tokens``).
        example_rows: ``position`` mode: ``[B, sum k]`` each example's row, the sum of its
            positions' rows, in the compute dtype.
    """

    grads: dict[str, torch.Tensor]
    loss: torch.Tensor
    n_targets: torch.Tensor
    offsets: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None
    example_rows: torch.Tensor | None = None


def row_example(offsets: torch.Tensor) -> torch.Tensor:
    """``[N]`` example index of each row, from ``[B + 1]`` offsets."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)


def right_align(input_ids, attention_mask, labels):
    """Move each row's real tokens to the front. Returns the rolled tensors and ``start [B]``,
    each row's original offset of its first real token."""
    real = attention_mask.bool()
    n = real.sum(1)
    start = torch.where(n > 0, real.long().argmax(1), torch.zeros_like(n))
    T = input_ids.shape[1]
    idx = torch.arange(T, device=input_ids.device)
    if bool((real != ((idx >= start[:, None]) & (idx < (start + n)[:, None]))).any()):
        raise ValueError("attention_mask must be one contiguous run of 1s per row (left or "
                         "right padding); packed or holed masks are not supported")
    if not bool(start.any()):
        return input_ids, attention_mask, labels, start
    src = (idx[None, :] + start[:, None]) % T
    roll = lambda t: torch.gather(t, 1, src)  # noqa: E731
    return roll(input_ids), roll(attention_mask), roll(labels), start


def check_batch(input_ids, attention_mask, labels):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, T] tensor")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                         f"{list(input_ids.shape)}")
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {list(labels.shape)} must match input_ids "
                         f"{list(input_ids.shape)}")
    return input_ids, attention_mask, labels
