"""Query gradients for a store: computed with the model and the store's exact maps, or read from a
second store cached from the query set; plus the training texts for readable results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grass_llm.capture import GradientCapture
from grass_llm.compress import parse_spec
from grass_llm.data import collate, read_records, tokenize_records
from grass_llm.models import load_model
from grass_llm.store import GradientStore, StoreError
from grass_llm.store.identity import model_identity


@dataclass
class QueryGrads:
    """Compressed gradients of a query set (per query, and per target token when asked)."""

    ids: list[str]
    grads: dict[str, torch.Tensor]  # {layer: [Q, K]}
    tokens: dict[str, torch.Tensor] | None = None  # {layer: [N, K]} one row per target token
    offsets: np.ndarray | None = None  # [Q + 1]
    positions: np.ndarray | None = None  # [N] label position of each token row
    token_texts: list[str] | None = None  # [N] the decoded target token of each token row


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


def from_store(store: GradientStore, qstore: GradientStore) -> QueryGrads:
    """Precomputed query gradients: a store cached (with the same config) from the queries."""
    check_same_maps(store, {x.name: (x.spec, x.seed, x.k) for x in qstore.layout.layers},
                    f"query store {qstore.url}")
    if store.meta.get("model", {}).get("weights_hash") != \
            qstore.meta.get("model", {}).get("weights_hash"):
        raise StoreError(f"query store {qstore.url} was computed with another model than "
                         f"{store.url}")
    n = qstore.n_examples
    grads = {x.name: torch.from_numpy(qstore.read_rows(x.name, 0, n))
             for x in qstore.layout.layers}
    return QueryGrads([str(i) for i in qstore.example_ids()], grads)


def from_file(store: GradientStore, path: str, *, per_token: bool = False,
              model_path: str | None = None) -> QueryGrads:
    """Compute query gradients with the store's model, compressor, seeds and loss."""
    cfg = store.meta.get("config")
    if not cfg:
        raise StoreError(f"{store.url} does not record its run config; cannot rebuild its maps")
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model, tok, _ = load_model(model_path or cfg["model"], dtype=dtype,
                               tokenizer=cfg.get("tokenizer"), seed=cfg.get("seed", 0),
                               adapter=cfg.get("adapter"))
    ident = model_identity(model)
    if ident["weights_hash"] != store.meta.get("model", {}).get("weights_hash"):
        raise StoreError(f"the model {model_path or cfg['model']!r} is not the one {store.url} "
                         "was cached with (weights differ); pass the store's model")
    records = read_records(path).records
    if not records:
        raise ValueError(f"{path}: no query (the file is empty)")
    examples = tokenize_records(records, tok, max_length=cfg.get("max_length", 1024),
                                overflow="truncate").examples
    names = [x.name for x in store.layout.layers]
    cap = GradientCapture(model, cfg["compressor"], layers=names, seed=cfg.get("seed", 0),
                          reduction=cfg.get("reduction", "sum"),
                          include_bias=cfg.get("include_bias", True),
                          token_mode="loss" if per_token else None, token_batch_size=16)
    check_same_maps(store, {n: (c.spec, c.seed, c.k) for n, c in cap.compressors.items()},
                    f"queries computed with {cfg['compressor']!r}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    grads = {n: [] for n in names}
    tokens = {n: [] for n in names}
    counts, positions = [], []
    with cap:
        for ex in examples:  # one query at a time: queries are few, memory stays small
            b = collate([ex], pad)
            out = cap(b["input_ids"], b["attention_mask"], b["labels"])
            for n in names:
                rows = out.grads[n]
                grads[n].append(rows.sum(0, keepdim=True) if per_token else rows)
                if per_token:
                    tokens[n].append(rows)
            if per_token:
                counts.append(rows.shape[0])
                positions.append(out.positions.numpy())
    q = QueryGrads([e.id for e in examples], {n: torch.cat(v) for n, v in grads.items()})
    if per_token:
        q.tokens = {n: torch.cat(v) for n, v in tokens.items()}
        q.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        q.positions = np.concatenate(positions)
        q.token_texts = [tok.decode([ex.input_ids[int(p)]])
                         for ex, n, a in zip(examples, counts, q.offsets[:-1])
                         for p in q.positions[a:a + n]]
    return q


def training_texts(store: GradientStore) -> dict[str, str]:
    """Store example id -> its text (from the corpus the store records), for snippets; empty
    when the corpus is no longer at its recorded path."""
    cfg = store.meta.get("config", {})
    path = cfg.get("data")
    if not path or not Path(path).exists():
        return {}
    try:
        records = read_records(path, on_error="skip").records
    except ValueError:
        return {}
    texts = {}
    for r in records:
        f = r.fields
        if "text" in f:
            t = str(f["text"])
        elif "prompt" in f:
            t = f"{f.get('prompt', '')}{f.get('completion', '')}"
        elif "messages" in f:
            t = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in f["messages"])
        else:
            continue
        texts[r.id] = t
    return texts


def snippet(texts: dict[str, str], example_id: str, width: int = 240) -> str | None:
    base = example_id.split("#", 1)[0] if example_id not in texts else example_id
    t = texts.get(base)
    if t is None:
        return None
    t = " ".join(t.split())
    return t if len(t) <= width else t[: width - 1] + "…"
