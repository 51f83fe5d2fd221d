"""Group examples into padded batches under a token budget, and pad them into tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from grass_llm.data.tokenize import IGNORE_INDEX, Example

if TYPE_CHECKING:  # torch is imported where it is used: the corpus's tokenizing workers
    import torch   # import grass_llm.data and need no torch (~200 MB per process)

PAD_SIDES = ("right", "left")


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *,
                         max_batch: int | None = None) -> list[list[int]]:
    """Groups example indices into batches whose padded size fits a token budget.

    Indices are sorted by length (stable, shortest first) and batches filled greedily, so each
    batch holds examples of similar length and pads little. A batch's padded size is
    ``len(batch) * max(lengths[i] for i in batch)`` tokens. Filling greedily over the sorted
    order gives the fewest batches possible: the feasible batches are closed under taking
    subsets, and an exchange argument shows some optimal grouping is contiguous in sorted order.

    Args:
        lengths: Length in tokens of each example (>= 0).
        max_tokens: Most padded tokens per batch (>= 1). An example longer than this forms a
            batch of its own.
        max_batch: Most examples per batch (>= 1), or None for no limit.

    Returns:
        The batches, each a list of indices into ``lengths`` (ascending length within a batch,
        batches in ascending length); every index appears exactly once.

    Raises:
        ValueError: A length is negative, or ``max_tokens``/``max_batch`` is below 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"lengths[{i}] is negative ({n})")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # sorted() is stable
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        # Ascending order: the newcomer is the longest, so it sets the padded length.
        full = max_batch is not None and len(batch) >= max_batch
        if batch and (full or (len(batch) + 1) * lengths[i] > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def collate(examples: list[Example], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pads examples into a batch of tensors.

    Args:
        examples: B >= 1 examples.
        pad_id: Token id written into padding positions of ``input_ids``.
        side: ``"right"`` pads after the tokens (training); ``"left"`` before them.

    Returns:
        ``input_ids`` [B, T] (padding ``pad_id``), ``attention_mask`` [B, T] (1 on tokens,
        0 on padding) and ``labels`` [B, T] (padding -100), all int64, with T the longest
        example's length.

    Raises:
        ValueError: No examples, an unknown side, or an example whose labels and ids differ in
            length.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}")
    for ex in examples:
        if len(ex.input_ids) != len(ex.labels):
            raise ValueError(f"example {ex.id!r} ({ex.location}) has {len(ex.input_ids)} "
                             f"input_ids but {len(ex.labels)} labels")
    width = max(len(ex.input_ids) for ex in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
