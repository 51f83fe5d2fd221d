"""Position mode's rows, written out layer by layer as the backward hooks produce them.

In ``token_mode="position"`` each layer's hook yields ``[B, T, k]`` float32 terms, one per
position. Kept until backward ends, every layer's block would be alive at once (all layers'
``B * T * k`` floats: ~30 GB for Llama-8B at B = 8, T = 1024, k = 4096 per layer) and then be
copied again (the real positions, then one concatenation). Here each layer's block is written
into one ``[N, sum k]`` buffer of the non-pad positions as soon as it arrives, in the dtype the
caller keeps (the store's), together with each example's row (the sum of its positions' rows,
in the blocks' own dtype), and freed: one layer's float32 block is alive at a time.

Tensor parallel: a rank's shard gives partial rows, which must be summed over the group before
they are rounded, so the buffer stays float32 until ``finish`` has reduced it (one collective
for the token rows, one for the example rows).
"""

from __future__ import annotations

import torch

from grass_llm.parallel import comm


class TokenRows:
    """The ``[N, sum k]`` rows of one batch's ``N`` non-pad positions, filled per layer.

    Args:
        real: ``[B, T]`` bool, the non-pad positions (row order: example, then position).
        widths: ``{layer: k}`` in the order of the buffer's column blocks.
        dtype: dtype of the token rows; None keeps the blocks' own (compute) dtype, which the
            example rows always have. The buffers are made when the first block arrives.
        partial: layers whose rows are tensor-parallel partial sums (``finish`` reduces them).
        group: the tensor-parallel group for ``partial``.
    """

    def __init__(self, real: torch.Tensor, widths: dict[str, int], dtype: torch.dtype,
                 partial: frozenset = frozenset(), group=None):
        self.real = real
        self.columns: dict[str, tuple[int, int]] = {}
        off = 0
        for name, k in widths.items():
            self.columns[name] = (off, off + k)
            off += k
        self.partial, self.group = partial, group
        self.dtype, self.width = dtype, off
        self.rows: torch.Tensor | None = None
        self.example: torch.Tensor | None = None
        self.filled: set[str] = set()

    def _allocate(self, like: torch.Tensor) -> None:
        counts = self.real.sum(1)
        n, B = int(counts.sum()), self.real.shape[0]  # one synchronization per batch
        self._example_of_row = torch.repeat_interleave(
            torch.arange(B, device=counts.device), counts, output_size=n)
        keep = self.dtype or like.dtype
        self.rows = torch.empty(n, self.width, dtype=like.dtype if self.partial else keep,
                                device=like.device)
        self.example = torch.zeros(B, self.width, dtype=like.dtype, device=like.device)
        self.dtype = keep

    def put(self, name: str, block: torch.Tensor) -> None:
        """Write layer ``name``'s ``[B, T, k]`` rows (its non-pad positions) and their sums."""
        a, b = self.columns[name]
        if block.shape[:2] != self.real.shape or block.shape[2] != b - a:
            raise RuntimeError(f"layer {name}: per-position rows of shape {list(block.shape)}, "
                               f"expected {[*self.real.shape, b - a]}")
        if self.rows is None:
            self._allocate(block)
        kept = block[self.real]  # [N, k], example-major like the buffer
        self.rows[:, a:b] = kept
        self.example[:, a:b].index_add_(0, self._example_of_row, kept.to(self.example.dtype))
        self.filled.add(name)

    def finish(self) -> None:
        """Sum the partial layers' rows over the tensor-parallel group, then round them."""
        missing = [n for n in self.columns if n not in self.filled]
        if missing:
            raise RuntimeError(f"no per-position rows for {len(missing)} layer(s), e.g. "
                               f"{missing[:3]}")
        if not self.partial:
            return
        names = [n for n in self.columns if n in self.partial]
        for buf in (self.rows, self.example):
            if len(names) == len(self.columns):
                comm.all_reduce(buf, group=self.group)
                continue
            flat = torch.cat([buf[:, slice(*self.columns[n])] for n in names], 1)
            comm.all_reduce(flat, group=self.group)
            off = 0
            for n in names:
                a, b = self.columns[n]
                buf[:, a:b] = flat[:, off:off + b - a]
                off += b - a
        if self.dtype != self.rows.dtype:
            self.rows = self.rows.to(self.dtype)

    def views(self) -> dict[str, torch.Tensor]:
        """``{layer: [N, k]}`` column blocks of the buffer (views, no copies)."""
        return {name: self.rows[:, a:b] for name, (a, b) in self.columns.items()}
