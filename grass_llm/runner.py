"""``grass-llm cache``: compressed gradients of a corpus into a store, on 1..N processes.

Composition, in this order (STYLE.md 1): process group and mesh (``parallel.dist``) -> model and
tokenizer -> corpus -> identities (before sharding: the full weights) -> sharding (one
``apply_*``) -> store (rank 0 creates, everyone opens) -> the step loop -> summary.

Work split: the store's row chunks go round robin to the data-parallel ranks (row order stays
dataset order); a rank's chunks are cut into token-budget batches. Under FSDP2 and ZeRO-3 every
forward/backward is a collective, so all ranks take the same number of steps: a rank that runs
out of work steps on a one-example filler batch whose result is dropped. Under tensor
parallelism all ranks of a group compute the same batch and its first rank writes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.capture import GradientCapture
from grass_llm.config import RunConfig
from grass_llm.data import collate, read_records, token_budget_batches, tokenize_records
from grass_llm.models import ADAPTER_LAYERS, load_model
from grass_llm.parallel import (
    apply_fsdp2,
    apply_tp,
    apply_zero3,
    build_mesh,
    comm,
    init_distributed,
    load_ds_config,
)
from grass_llm.store import LayerInfo, StoreLayout, create_store, open_store
from grass_llm.store.identity import (
    dataset_fingerprint,
    model_identity,
    tokenizer_identity,
)

# Config fields that do not change what is computed: a rerun that differs only in these resumes.
_NOT_IDENTITY = ("out", "overwrite")
_MAX_SKIPPED_RECORDED = 1000


@dataclass
class Summary:
    examples: int
    tokens: int
    seconds: float
    chunks_written: int
    chunks_total: int
    skipped: int
    store: str
    store_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class _Setup:
    module: torch.nn.Module
    tp_group: object
    keep: tuple
    dp_rank: int
    dp_size: int
    writer: bool
    lockstep: bool


def _shard(cfg: RunConfig, model, info) -> _Setup:
    """Apply the configured parallelism; returns what the step loop needs."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.parallel == "none" or not info.distributed:
        if cfg.parallel != "none" and info.is_main:
            print(f"note: parallel={cfg.parallel} with one process runs unsharded")
        return _Setup(model.to(info.device), None, (), info.rank, info.world_size, True, False)
    if cfg.parallel == "fsdp":
        mesh = build_mesh(info, 1)
        return _Setup(apply_fsdp2(model.to(info.device), mesh["dp"]), None, (), info.rank,
                      info.world_size, True, True)
    if cfg.parallel == "deepspeed":
        module, anchor = apply_zero3(model, load_ds_config(cfg.deepspeed_config, dtype=dtype))
        return _Setup(module, None, (anchor,), info.rank, info.world_size, True, True)
    tp = cfg.tp_size or info.world_size
    mesh = build_mesh(info, tp)
    apply_tp(model.to(info.device), mesh["tp"])
    tp_rank = mesh["tp"].get_local_rank()
    return _Setup(model, mesh["tp"].get_group(), (), mesh["dp"].get_local_rank(),
                  mesh["dp"].size(), tp_rank == 0, True)


def _token_counts(examples, token_mode) -> tuple[int, ...] | None:
    if token_mode is None:
        return None
    if token_mode == "position":
        return tuple(len(e.input_ids) for e in examples)
    return tuple(int(sum(1 for lab in e.labels[1:] if lab != -100)) for e in examples)


def _describe(cfg, examples, skipped, model, tok, name, capture) -> tuple[StoreLayout, dict]:
    """The store's layout and self-description (hashes every weight: rank 0 only)."""
    ident_cfg = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
    meta = {
        "config": ident_cfg,
        "model": model_identity(model, name),
        "tokenizer": tokenizer_identity(tok),
        "dataset": {"path": cfg.data, **dataset_fingerprint(
            (e.id, e.input_ids, e.labels) for e in examples),
            "skipped_count": len(skipped),
            "skipped": [dataclasses.asdict(s) for s in skipped[:_MAX_SKIPPED_RECORDED]]},
        "loss_reduction": cfg.reduction,
        "model_dtype": cfg.dtype,
    }
    layers = tuple(LayerInfo(n, c.spec, c.seed, c.k, capture.layers[n].in_features,
                             capture.layers[n].out_features, capture._bias[n])
                   for n, c in capture.compressors.items())
    layout = StoreLayout(n_examples=len(examples), layers=layers, chunk_rows=cfg.chunk_rows,
                         dtype=cfg.store_dtype, codec=cfg.codec, token_mode=cfg.token_mode,
                         token_counts=_token_counts(examples, cfg.token_mode))
    return layout, meta


def _open(cfg, info, examples, skipped, model, tok, name, capture):
    """Rank 0 creates (or reopens to resume) the store; after a barrier the others open it."""
    store = None
    with comm.guarded("creating the store"):
        if info.is_main:
            layout, meta = _describe(cfg, examples, skipped, model, tok, name, capture)
            store = create_store(cfg.out, layout, meta, overwrite=cfg.overwrite)
    with comm.guarded("opening the store"):
        if not info.is_main:
            store = open_store(cfg.out, mode="r+")
    return store


def run_cache(cfg: RunConfig, *, progress: bool = True) -> Summary:
    """Run the cache job for this process (call it on every rank)."""
    info = init_distributed()
    if not info.is_main:
        _quiet()
    t_start = time.perf_counter()
    dtype = getattr(torch, cfg.dtype)
    model, tok, name = load_model(cfg.model, dtype=dtype, tokenizer=cfg.tokenizer,
                                  seed=cfg.seed, adapter=cfg.adapter)
    if cfg.adapter is not None and cfg.layers is None:
        cfg = dataclasses.replace(cfg, layers=list(ADAPTER_LAYERS))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    read = read_records(cfg.data, on_error=cfg.on_bad_record)
    toks = tokenize_records(read.records, tok, max_length=cfg.max_length,
                            overflow=cfg.overflow, on_error=cfg.on_bad_record)
    examples, skipped = toks.examples, read.skipped + toks.skipped
    if not examples:
        raise ValueError(f"{cfg.data}: no usable example ({len(skipped)} skipped)")
    # Layer selection and maps from the unsharded model: names and shapes are global.
    probe = GradientCapture(model, cfg.compressor, layers=cfg.layers, exclude=cfg.exclude,
                            seed=cfg.seed, include_bias=cfg.include_bias)
    store = _open(cfg, info, examples, skipped, model, tok, name, probe)
    setup = _shard(cfg, model, info)
    capture = GradientCapture(setup.module, cfg.compressor, layers=cfg.layers,
                              exclude=cfg.exclude, seed=cfg.seed, reduction=cfg.reduction,
                              token_mode=cfg.token_mode, include_bias=cfg.include_bias,
                              tp_group=setup.tp_group, keep_trainable=setup.keep)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loop = _Loop(cfg, info, setup, store, examples, capture, pad_id, progress)
    written, tokens = loop.run()
    totals = comm.all_reduce(torch.tensor([written, tokens], dtype=torch.long))
    comm.barrier()
    done = store.done_chunks()
    return Summary(examples=len(examples), tokens=int(totals[1]),
                   seconds=time.perf_counter() - t_start, chunks_written=int(totals[0]),
                   chunks_total=int(done.size), skipped=len(skipped), store=cfg.out,
                   store_bytes=_local_size(cfg.out))


def _local_size(url: str) -> int | None:
    """Bytes on disk of a local store (None for remote URLs)."""
    from pathlib import Path

    root = Path(url)
    if "://" in url or not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class _Loop:
    """The step loop of one rank: batches of its chunks, lockstep fillers, chunk writes."""

    def __init__(self, cfg, info, setup, store, examples, capture, pad_id, progress):
        self.cfg, self.info, self.setup, self.store = cfg, info, setup, store
        self.examples, self.capture, self.pad_id = examples, capture, pad_id
        self.progress = progress and info.is_main
        self.lengths = np.array([len(e.input_ids) for e in examples])
        self.plans = [self._plan(store.pending_chunks(r, setup.dp_size))
                      for r in range(setup.dp_size)]

    def _plan(self, chunks: list[int]) -> list[tuple[int, list[int]]]:
        """``[(chunk, example indices of one batch), ...]`` for a rank's pending chunks."""
        steps = []
        for c in chunks:
            a, b = self.store.layout.chunk_range(c)
            for batch in token_budget_batches(self.lengths[a:b].tolist(), self.cfg.max_tokens):
                steps.append((c, [a + i for i in batch]))
        return steps

    def run(self) -> tuple[int, int]:
        mine = self.plans[self.setup.dp_rank]
        n_steps = max(len(p) for p in self.plans) if self.setup.lockstep else len(mine)
        filler = [int(np.argmin(self.lengths))]
        buffers: dict[int, dict] = {}
        remaining = {c: len(range(*self.store.layout.chunk_range(c))) for c, _ in mine}
        tokens, written, examples = 0, 0, 0
        n_mine = sum(len(ix) for _, ix in mine)
        bar = _bar(self.progress, int(sum(self.lengths[ix].sum() for _, ix in mine)))
        with self.capture as cap:
            for step in range(n_steps):
                if step >= len(mine):  # lockstep filler: keeps collectives matched
                    self._compute(cap, filler)
                    continue
                c, idx = mine[step]
                out = self._compute(cap, idx)
                buf = buffers.setdefault(c, {})
                for j, i in enumerate(idx):
                    buf[i] = self._row(out, j)
                n_tok = int(self.lengths[idx].sum())
                tokens += n_tok
                examples += len(idx)
                if bar is not None:
                    bar.set_postfix(examples=f"{examples}/{n_mine}", refresh=False)
                    bar.update(n_tok)
                remaining[c] -= len(idx)
                if remaining[c] == 0:
                    if self.setup.writer:
                        self._write(c, buffers.pop(c))
                        written += 1
                    else:
                        buffers.pop(c)
        if bar is not None:
            bar.close()
        # tensor-parallel ranks of one group computed the same tokens: count them once
        return written, tokens if self.setup.writer else 0

    def _compute(self, cap, idx):
        batch = collate([self.examples[i] for i in idx], self.pad_id)
        dev = self.info.device
        return cap(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                   batch["labels"].to(dev))

    def _row(self, out, j: int) -> dict:
        row = {"loss": float(out.loss[j]), "n": int(out.n_targets[j])}
        if out.offsets is None:
            row["grads"] = {k: v[j].float().cpu() for k, v in out.grads.items()}
            return row
        a, b = int(out.offsets[j]), int(out.offsets[j + 1])
        row["tokens"] = {k: v[a:b].float().cpu() for k, v in out.grads.items()}
        # the example's row is the sum of its token rows (exact: the maps are linear)
        row["grads"] = {k: v.sum(0) for k, v in row["tokens"].items()}
        row["positions"] = out.positions[a:b].cpu()
        return row

    def _write(self, c: int, rows: dict[int, dict]) -> None:
        a, b = self.store.layout.chunk_range(c)
        order = [rows[i] for i in range(a, b)]
        names = list(order[0]["grads"])
        kwargs = {}
        if self.cfg.token_mode is not None:
            kwargs["token_grads"] = {k: torch.cat([r["tokens"][k] for r in order])
                                     for k in names}
            kwargs["token_positions"] = torch.cat([r["positions"] for r in order])
        self.store.write_chunk(
            c, {k: torch.stack([r["grads"][k] for r in order]) for k in names},
            [self.examples[i].id for i in range(a, b)], [r["n"] for r in order],
            [r["loss"] for r in order], nonfinite=self.cfg.nonfinite, **kwargs)


def _quiet() -> None:
    """Ranks other than 0 only speak when they fail (their exceptions still propagate)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="caching (rank 0's share)",
                dynamic_ncols=True, smoothing=0.1)
