"""Query gradients for a store: computed with the model and the store's exact maps (on the GPU
when there is one, batched under the cache job's token budget, split over ranks; the model
whole on every rank, or sharded with FSDP2 / tensor parallelism by the cache job's own path,
``grass_llm.sharding``), or read from a second store cached from the query set.

Per-token rows (``token_mode``):

- ``"position"``: one row per input position t, the term ``delta_t x_t^T`` of the query's
  gradient, all from the one backward pass of the query's batch (exact, cheap).
- ``"loss"``: one row per target token t, the gradient of that token's loss alone. One backward
  pass cannot separate two tokens' loss gradients: through causal attention, the loss at t
  reaches every earlier position, so summed losses mix there. What the math does allow is one
  *batch row* per target token: row t holds the query's first t + 1 tokens with only label t
  (later positions do not affect that loss under causal attention, so truncating them changes
  nothing but the cost), and rows of several tokens and queries share a forward and a backward
  pass under the token budget. A query of T target tokens thus costs about ``sum_t t`` tokens
  of compute instead of ``T^2``; tests check the rows against a for-loop of single backward()
  calls in float64.

The example-level rows always come from ordinary per-example backward passes, so a query's own
scores are the same with or without per-token rows. Shapes: Q queries, N token rows, K a
layer's size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from grass_llm.capture import GradientCapture
from grass_llm.capture.hooks import TOKEN_MODES
from grass_llm.compress import parse_spec
from grass_llm.data import (
    IGNORE_INDEX,
    Example,
    collate,
    read_records,
    token_budget_batches,
    tokenize_records,
)
from grass_llm.data.specials import recorded_policy  # tokenized as the store's corpus was
from grass_llm.influence.reader import resolve_device
from grass_llm.parallel import comm, init_distributed
from grass_llm.sharding import Sharded, load_on_ranks, shard_model
from grass_llm.store import GradientStore, StoreError
from grass_llm.store.identity import run_model_identity


@dataclass
class QueryGrads:
    """Compressed gradients of a query set (per query, and per token when asked)."""

    ids: list[str]
    grads: dict[str, torch.Tensor]  # {layer: [Q, K]}
    tokens: dict[str, torch.Tensor] | None = None  # {layer: [N, K]} per-token rows
    offsets: np.ndarray | None = None  # [Q + 1] rows of query j: offsets[j]:offsets[j + 1]
    positions: np.ndarray | None = None  # [N] label position (loss) / input position (position)
    token_texts: list[str] | None = None  # [N] the decoded token of each row
    token_mode: str | None = None
    tokenizer: object = None  # the store's tokenizer, when the model computed the rows


def check_same_maps(store: GradientStore, layers: dict[str, tuple[str, int, int]], what: str):
    """Refuse query gradients whose per-layer (spec, seed, k) differ from the store's."""
    want = {x.name: (x.spec, x.seed, x.k) for x in store.layout.layers}
    if set(layers) != set(want):
        missing = sorted(set(want) - set(layers))[:3]
        extra = sorted(set(layers) - set(want))[:3]
        raise StoreError(f"{what} hooks other layers than {store.url} (missing {missing}, "
                         f"extra {extra})")
    for name, got in layers.items():
        if got != want[name]:
            masks = [parse_spec(s)[1].get("mask_sha256") for s in (got[0], want[name][0])]
            if masks[0] != masks[1]:  # a learned mask's file changed (or is missing)
                g, w = (f"the mask file with SHA-256 {m[:12]}..." if m else "a random mask"
                        for m in masks)
                raise StoreError(f"{what}: layer {name} uses {g} but {store.url} was built "
                                 f"with {w}; query with the store's mask file")
            raise StoreError(f"{what}: layer {name} uses compressor {got[0]!r} seed {got[1]} "
                             f"but {store.url} was built with {want[name][0]!r} seed "
                             f"{want[name][1]}; query with the store's own configuration")


def check_same_special_tokens(store: GradientStore, qstore: GradientStore) -> None:
    """Refuse a query store whose examples got other BOS/EOS tokens than the store's (a
    store of an older version, which records none, is not checked)."""
    got, want = (s.meta.get("special_tokens") for s in (qstore, store))
    if got is None or want is None:
        return
    if (got["bos"], got["eos"]) != (want["bos"], want["eos"]):
        raise StoreError(f"query store {qstore.url} was cached with other special tokens "
                         f"(BOS {got['bos']}, EOS {got['eos']}) than {store.url} (BOS "
                         f"{want['bos']}, EOS {want['eos']}); cache the queries with the "
                         "store's add_bos / add_eos")


def from_store(store: GradientStore, qstore: GradientStore) -> QueryGrads:
    """Precomputed query gradients: a store cached (with the same config) from the queries."""
    check_same_maps(store, {x.name: (x.spec, x.seed, x.k) for x in qstore.layout.layers},
                    f"query store {qstore.url}")
    if store.meta.get("model", {}).get("weights_hash") != \
            qstore.meta.get("model", {}).get("weights_hash"):
        raise StoreError(f"query store {qstore.url} was computed with another model than "
                         f"{store.url}")
    check_same_special_tokens(store, qstore)
    n = qstore.n_examples
    grads = {x.name: torch.from_numpy(qstore.read_rows(x.name, 0, n))
             for x in qstore.layout.layers}
    return QueryGrads([str(i) for i in qstore.example_ids()], grads)


QUERY_PARALLEL = ("none", "fsdp", "tp")


def from_file(store: GradientStore, path: str, *, per_token: bool = False,
              token_mode: str = "loss", model_path: str | None = None,
              device: str | torch.device = "auto", max_tokens: int | None = None,
              parallel: str = "none", shard_size: int = 0, tp_size: int = 0) -> QueryGrads:
    """Compute query gradients with the store's model, compressor, seeds and loss.

    Args:
        store: the store whose maps and model the queries must use.
        path: a query file (corpus formats and fields).
        per_token: also per-token rows, of ``token_mode`` ``"loss"`` or ``"position"``.
        model_path: the model, if it moved since the store was made (same weights).
        device: ``"auto"`` (this rank's GPU if any, else CPU) or a device; with
            ``parallel="none"`` only (a sharded model lives on this rank's device).
        max_tokens: padded tokens per forward/backward (default: the store's ``max_tokens``).
        parallel: ``"none"`` (every rank loads the whole model and takes its own batches),
            ``"fsdp"`` (FSDP2 over ``shard_size`` ranks, HSDP beyond) or ``"tp"`` (tensor
            parallel over ``tp_size`` ranks): the cache job's loading and sharding
            (``grass_llm.sharding``); sizes of 0 mean the ranks of one node.

    Collective under torch.distributed: the batches are split over the data-parallel ranks
    and every rank gets all rows, in query order.
    """
    if per_token and token_mode not in ("loss", "position"):
        raise ValueError(f"token_mode must be 'loss' or 'position', got {token_mode!r}")
    if parallel not in QUERY_PARALLEL:
        raise ValueError(f"parallel must be one of {list(QUERY_PARALLEL)} for query "
                         f"gradients, got {parallel!r}")
    cfg = store.meta.get("config")
    if not cfg:
        raise StoreError(f"{store.url} does not record its run config; cannot rebuild its maps")
    info = init_distributed()
    model, tok, _ = load_on_ranks(info, parallel, model=model_path or cfg["model"],
                                  dtype=cfg.get("dtype", "float32"),
                                  tokenizer=cfg.get("tokenizer"), seed=cfg.get("seed", 0),
                                  adapter=cfg.get("adapter"))
    capture = {"layers": [x.name for x in store.layout.layers], "seed": cfg.get("seed", 0),
               "reduction": cfg.get("reduction", "sum"),
               "include_bias": cfg.get("include_bias", True)}
    with comm.guarded("checking the query model"):
        if info.is_main:  # the others load the same files (none) or rank 0's weights
            _check_model(store, model, cfg, capture, model_path)
    records = read_records(path).records
    if not records:
        raise ValueError(f"{path}: no query (the file is empty)")
    examples = tokenize_records(records, tok, max_length=cfg.get("max_length", 1024),
                                overflow="truncate", **recorded_policy(store.meta, tok)).examples
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if parallel == "none":
        info = replace(info, device=resolve_device(device))
    elif str(device) != "auto" and resolve_device(device) != info.device:
        warnings.warn(f"device={device} is ignored with parallel={parallel}: a sharded model "
                      f"runs on this rank's device ({info.device})", stacklevel=2)
    setup = shard_model(model, info, parallel, dtype=cfg.get("dtype", "float32"),
                        shard_size=shard_size, tp_size=tp_size)
    del model
    q = query_gradients(setup.module, cfg["compressor"], examples, pad, capture=capture,
                        token_mode=token_mode if per_token else None,
                        max_tokens=max_tokens or cfg.get("max_tokens", 8192),
                        device=info.device, setup=setup)
    q.tokenizer = tok
    if per_token:
        q.token_texts = [tok.decode([ex.input_ids[int(p)]]) for j, ex in enumerate(examples)
                         for p in q.positions[q.offsets[j]: q.offsets[j + 1]]]
    return q


def _check_model(store: GradientStore, model, cfg: dict, capture: dict, model_path) -> None:
    """Refuse a model whose weights or maps are not the store's (rank 0: the full model)."""
    # The hash is cached by checkpoint file as the cache job's is: an 8B model is hashed once,
    # not at every query run.
    ident = run_model_identity(model, None, spec=model_path or cfg["model"],
                               dtype=cfg.get("dtype", "float32"), seed=cfg.get("seed", 0),
                               adapter=cfg.get("adapter"))
    if ident["weights_hash"] != store.meta.get("model", {}).get("weights_hash"):
        raise StoreError(f"the model {model_path or cfg['model']!r} is not the one {store.url} "
                         "was cached with (weights differ); pass the store's model")
    probe = GradientCapture(model, cfg["compressor"], **capture)
    check_same_maps(store, {n: (c.spec, c.seed, c.k) for n, c in probe.compressors.items()},
                    f"queries computed with {cfg['compressor']!r}")


def query_gradients(model: torch.nn.Module, spec: str, examples: list[Example], pad_id: int, *,
                    capture: dict, token_mode: str | None = None, max_tokens: int = 8192,
                    device: torch.device | str = "cpu",
                    setup: Sharded | None = None) -> QueryGrads:
    """Example-level (and per-token) compressed gradients of ``examples``, in their order.

    Args:
        model: the causal LM, already on ``device`` (``setup.module`` when sharded).
        spec: compressor spec; ``capture``: the other ``GradientCapture`` keyword arguments
            (layers, seed, reduction, include_bias).
        token_mode: None, ``"loss"`` or ``"position"`` (see the module docstring).
        max_tokens: padded tokens per forward/backward (a longer sequence runs alone).
        device: where the batches go (the model's device).
        setup: how ``model`` is sharded (``grass_llm.sharding.shard_model``); None: a full
            copy on every rank, batches round robin over all ranks.

    Collective under torch.distributed: the batches go round robin over the data-parallel
    ranks (all ranks of a tensor-parallel group take the same ones; under FSDP every rank
    takes the same number of steps) and every rank returns all rows.
    """
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
    if token_mode == "loss" and capture.get("reduction", "sum") != "sum":
        raise ValueError("per-token loss rows need the store's loss reduction to be 'sum'")
    if setup is None:
        setup = Sharded(model, None, (), comm.rank(), comm.world_size(), True, False)
    capture = {**capture, "tp_group": setup.tp_group, "keep_trainable": setup.keep}
    run = _Runner(setup, pad_id, torch.device(device))
    batches = token_budget_batches([len(e.input_ids) for e in examples], max_tokens)
    with GradientCapture(model, spec, **capture) as cap:
        outs = run(cap, [[examples[i] for i in b] for b in batches])
    rows = _scatter_rows(batches, outs, len(examples))
    q = QueryGrads([e.id for e in examples], _stack(rows), token_mode=token_mode)
    if token_mode == "loss":
        _loss_rows(q, run, model, spec, capture, examples, max_tokens)
    elif token_mode == "position":
        with GradientCapture(model, spec, token_mode="position", **capture) as cap:
            outs = run(cap, [[examples[i] for i in b] for b in batches])
        per_ex: list = [None] * len(examples)
        for b, (grads, offsets, positions) in zip(batches, outs):
            for j, i in enumerate(b):
                a, e = int(offsets[j]), int(offsets[j + 1])
                per_ex[i] = ({k: v[a:e] for k, v in grads.items()}, positions[a:e])
        _set_token_rows(q, [r[0] for r in per_ex], [r[1].numpy() for r in per_ex])
    return q


@dataclass
class _Runner:
    """Runs a list of batches over the ranks of ``setup`` and gathers every batch's result."""

    setup: Sharded
    pad_id: int
    device: torch.device

    def __call__(self, cap: GradientCapture, batches: list[list[Example]]) -> list[tuple]:
        """``(grads on CPU, offsets, positions)`` of every batch, on every rank. Batch b is
        computed by data-parallel rank b mod dp size (every rank of its tensor-parallel group:
        the group's collectives need them all; its first rank reports it). In lockstep (FSDP)
        a rank out of batches steps on the shortest one and drops the result."""
        s = self.setup
        if not batches:  # the same list on every rank: they all return here
            return []
        mine = list(range(s.dp_rank, len(batches), s.dp_size))
        n_steps = comm.agree(len(mine), "max") if s.lockstep else len(mine)
        filler = min(range(len(batches)), key=lambda b: sum(len(e.input_ids)
                                                            for e in batches[b]))
        local = {}
        with comm.guarded("computing query gradients"):
            for step in range(n_steps):
                b = mine[step] if step < len(mine) else filler
                out = self._step(cap, batches[b])
                if step < len(mine) and s.writer:
                    local[b] = ({k: v.detach().cpu() for k, v in out.grads.items()},
                                None if out.offsets is None else out.offsets.cpu(),
                                None if out.positions is None else out.positions.cpu())
        merged = {}
        for part in comm.all_gather_object(local):
            merged.update(part)
        return [merged[b] for b in range(len(batches))]

    def _step(self, cap: GradientCapture, batch: list[Example]):
        t = collate(batch, self.pad_id)
        dev = self.device
        return cap(t["input_ids"].to(dev), t["attention_mask"].to(dev), t["labels"].to(dev))


def _scatter_rows(batches: list[list[int]], outs: list[tuple], n: int) -> list[dict]:
    """Per-row results of index batches back in index order: ``[{layer: [K]}] * n``."""
    rows: list = [None] * n
    for b, (grads, _, _) in zip(batches, outs):
        for j, i in enumerate(b):
            rows[i] = {k: v[j] for k, v in grads.items()}
    return rows


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _set_token_rows(q: QueryGrads, per_example: list[dict], positions: list[np.ndarray]):
    """Concatenate each query's token rows: ``q.tokens``, ``offsets``, ``positions``."""
    counts = [len(p) for p in positions]
    q.tokens = {k: torch.cat([r[k] for r in per_example]) for k in per_example[0]}
    q.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    q.positions = np.concatenate(positions).astype(np.int64)


def single_target_rows(ex: Example) -> list[tuple[int, Example]]:
    """``(t, row)`` for every target token t of ``ex`` (label positions t >= 1): the first t + 1
    tokens with only label t, whose loss gradient is token t's own (see module docstring)."""
    out = []
    for t in range(1, len(ex.labels)):
        if ex.labels[t] == IGNORE_INDEX:
            continue
        labels = [IGNORE_INDEX] * t + [ex.labels[t]]
        out.append((t, replace(ex, input_ids=ex.input_ids[: t + 1], labels=labels)))
    return out


def _loss_rows(q, run: _Runner, model, spec, capture, examples, max_tokens) -> None:
    """Each target token's own loss gradient: one truncated single-target row per token,
    rows of all queries batched under the token budget."""
    specs = [(i, t, row) for i, ex in enumerate(examples) for t, row in single_target_rows(ex)]
    batches = token_budget_batches([len(r.input_ids) for _, _, r in specs], max_tokens)
    with GradientCapture(model, spec, **capture) as cap:
        outs = run(cap, [[specs[s][2] for s in b] for b in batches])
    rows = _scatter_rows(batches, outs, len(specs))
    per_ex = [[] for _ in examples]
    pos = [[] for _ in examples]
    for (i, t, _), r in zip(specs, rows):
        per_ex[i].append(r)
        pos[i].append(t)
    names = list(q.grads)
    empty = {k: q.grads[k].new_zeros(0, q.grads[k].shape[1]) for k in names}
    _set_token_rows(q, [_stack(r) if r else empty for r in per_ex],
                    [np.asarray(p, dtype=np.int64) for p in pos])
