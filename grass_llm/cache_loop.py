"""The step loop of ``grass-llm cache`` on one rank: batches of its chunks, lockstep fillers,
one device-to-host copy per batch, chunk writes in the background.

Per batch, every layer's compressed rows are concatenated on the device into one ``[B, ΣK]``
buffer in the store's dtype (the cast is where float16 overflow becomes Inf, which the store
flags exactly as before), copied with one non-blocking copy into pinned host memory, and only
collected (placed into the chunk's host buffer) after the next batch has been launched, so the
copy overlaps compute. A finished chunk goes to a ``ChunkWriter`` thread. The loop runs under
``host_heap.steady_heap``, so that the steps reuse host memory instead of faulting it in again
each step. Shapes: B examples of a batch, N token rows of a batch, R rows of a chunk, ΣK the
numbers stored per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.data import collate, token_budget_batches
from grass_llm.host_heap import steady_heap
from grass_llm.parallel import comm
from grass_llm.store.writer import ChunkWriter

STORE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                      "float32": torch.float32}


def plan_steps(store, lengths: np.ndarray, chunks: list[int],
               max_tokens: int) -> list[tuple[int, np.ndarray]]:
    """``[(chunk, example indices of one batch), ...]`` over ``chunks``, token-budget batches
    within each chunk (a chunk is never split across ranks)."""
    steps = []
    for c in chunks:
        a, b = store.layout.chunk_range(c)
        for batch in token_budget_batches(lengths[a:b].tolist(), max_tokens):
            steps.append((c, a + np.asarray(batch, dtype=np.int64)))
    return steps


def _columns_of(buf: torch.Tensor, views: list[torch.Tensor]) -> bool:
    """Whether ``views`` are ``buf``'s consecutive column blocks, in order (the store's layer
    order is the capture's)."""
    off = 0
    for v in views:
        if (v.data_ptr() != buf.data_ptr() + off * buf.element_size() or v.dtype != buf.dtype
                or v.shape[0] != buf.shape[0]):
            return False
        off += v.shape[1]
    return off == buf.shape[1]


@dataclass
class _Staged:
    """One batch's rows on their way to the host (``event`` marks the copy's end on GPUs)."""

    chunk: int
    idx: np.ndarray
    rows: torch.Tensor  # [B, ΣK] store dtype
    loss: torch.Tensor  # [B]
    n: torch.Tensor  # [B]
    tokens: torch.Tensor | None = None  # [N, ΣK]
    offsets: torch.Tensor | None = None  # [B + 1]
    positions: torch.Tensor | None = None  # [N]
    event: object = None


def stage_batch(c: int, idx: np.ndarray, out, names: list[str], dtype: torch.dtype,
                pinned: bool) -> _Staged:
    """All layers' rows of one batch (``out``: a ``CaptureOutput``) in one device buffer in the
    store's dtype, with one non-blocking copy into pinned host memory when ``pinned``."""
    grads = [out.grads[n] for n in names]
    if out.offsets is None:
        rows, tokens = torch.cat(grads, 1), None
    elif out.token_rows is not None and _columns_of(out.token_rows, grads):
        # position mode, streamed: the capture's own buffer, already in the store's dtype
        rows, tokens = out.example_rows, out.token_rows.to(dtype)
    else:
        tok32 = torch.cat(grads, 1)
        ex = torch.repeat_interleave(torch.arange(len(idx), device=tok32.device),
                                     out.offsets[1:] - out.offsets[:-1])
        # the example's row is the sum of its token rows (exact: the maps are linear)
        rows = tok32.new_zeros(len(idx), tok32.shape[1]).index_add_(0, ex, tok32)
        tokens = tok32.to(dtype)
    staged = _Staged(c, idx, rows.to(dtype), out.loss.float(), out.n_targets, tokens,
                     out.offsets, out.positions)
    if not pinned:
        return staged
    for f in ("rows", "loss", "n", "tokens", "offsets", "positions"):
        t = getattr(staged, f)
        if t is not None:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            setattr(staged, f, host)
    staged.event = torch.cuda.Event()
    staged.event.record()
    return staged


class _ChunkBuffer:
    """Host rows of one row chunk while its batches arrive (any order within the chunk)."""

    def __init__(self, a: int, b: int, width: int, dtype: torch.dtype):
        self.a, self.b = a, b
        self.rows = torch.empty(b - a, width, dtype=dtype)
        self.loss = np.zeros(b - a, dtype=np.float32)
        self.n = np.zeros(b - a, dtype=np.int64)
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.missing = b - a

    def place(self, s: _Staged) -> int:
        """Put a staged batch's rows in place (waiting for its copy); returns rows missing."""
        if s.event is not None:
            s.event.synchronize()
        local = s.idx - self.a
        self.rows[torch.from_numpy(local)] = s.rows
        self.loss[local] = s.loss.numpy()
        self.n[local] = s.n.cpu().numpy()
        if s.tokens is not None:
            off = s.offsets.cpu().numpy()
            for j, i in enumerate(s.idx.tolist()):
                self.tokens[i] = (s.tokens[off[j]:off[j + 1]], s.positions[off[j]:off[j + 1]])
        self.missing -= len(s.idx)
        return self.missing


class CacheLoop:
    """Runs this rank's share of the cache job (see the module docstring)."""

    def __init__(self, cfg, setup, store, corpus, capture, pad_id: int, device, progress: bool,
                 done: np.ndarray):
        self.cfg, self.setup, self.store, self.corpus = cfg, setup, store, corpus
        self.capture, self.pad_id, self.device, self.progress = capture, pad_id, device, progress
        self.names = store.layer_names
        self.widths = [lay.k for lay in store.layout.layers]
        self.dtype = STORE_TORCH_DTYPES[store.layout.dtype]
        self.lengths = np.asarray(corpus.lengths)
        chunks = [c for c in range(setup.dp_rank, store.layout.n_chunks, setup.dp_size)
                  if not done[c]]
        self.steps = plan_steps(store, self.lengths, chunks, cfg.max_tokens)
        # Under FSDP2 / ZeRO-3 every forward and backward is a collective: all ranks take the
        # same number of steps, agreed before the loop (never read from markers that other
        # ranks' writers may be changing).
        self.n_steps = (comm.agree(len(self.steps), "max") if setup.lockstep
                        else len(self.steps))
        self.pinned = device.type == "cuda"

    def run(self) -> tuple[int, int]:
        """Returns ``(chunks written, tokens computed)`` by this rank."""
        writer = ChunkWriter(self.store) if self.setup.writer else None
        buffers: dict[int, _ChunkBuffer] = {}
        filler = np.array([int(np.argmin(self.lengths))])
        bar = self._bar()
        tokens, pending = 0, None
        try:
            with steady_heap(), self.capture as cap:
                for step in range(self.n_steps):
                    if step >= len(self.steps):  # lockstep filler: keeps collectives matched
                        self._compute(cap, filler)
                        continue
                    c, idx = self.steps[step]
                    out = self._compute(cap, idx)
                    staged = self._stage(c, idx, out) if writer is not None else None
                    if pending is not None:
                        self._collect(pending, buffers, writer)
                    pending = staged
                    n_tok = int(self.lengths[idx].sum())
                    tokens += n_tok
                    if bar is not None:
                        bar.update(n_tok)
                if pending is not None:
                    self._collect(pending, buffers, writer)
            written = writer.close() if writer is not None else 0
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        # tensor-parallel ranks of one group computed the same tokens: count them once
        return written, tokens if self.setup.writer else 0

    def _compute(self, cap, idx):
        batch = collate(self.corpus.examples(idx), self.pad_id)
        dev = self.device
        return cap(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                   batch["labels"].to(dev))

    def _stage(self, c: int, idx: np.ndarray, out) -> _Staged:
        return stage_batch(c, idx, out, self.names, self.dtype, self.pinned)

    def _collect(self, s: _Staged, buffers: dict, writer: ChunkWriter) -> None:
        a, b = self.store.layout.chunk_range(s.chunk)
        buf = buffers.get(s.chunk)
        if buf is None:
            buf = buffers[s.chunk] = _ChunkBuffer(a, b, sum(self.widths), self.dtype)
        if buf.place(s) == 0:
            writer.submit(s.chunk, **self._chunk_kwargs(buffers.pop(s.chunk)))

    def _chunk_kwargs(self, buf: _ChunkBuffer) -> dict:
        splits = np.cumsum([0] + self.widths)
        kwargs = {
            "grads": {n: buf.rows[:, splits[j]:splits[j + 1]] for j, n in enumerate(self.names)},
            "example_ids": self.corpus.ids(buf.a, buf.b), "n_targets": buf.n, "loss": buf.loss,
            "nonfinite": self.cfg.nonfinite}
        if self.cfg.token_mode is not None:
            order = [buf.tokens[i] for i in range(buf.a, buf.b)]
            tok = torch.cat([t for t, _ in order])
            kwargs["token_grads"] = {n: tok[:, splits[j]:splits[j + 1]]
                                     for j, n in enumerate(self.names)}
            kwargs["token_positions"] = torch.cat([p for _, p in order])
        return kwargs

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = int(sum(int(self.lengths[idx].sum()) for _, idx in self.steps))
        return tqdm(total=total, unit="tok", unit_scale=True, desc="caching (rank 0's share)",
                    dynamic_ncols=True, smoothing=0.1)
