"""``grass-llm query``: query gradients -> preconditioned -> one streamed pass -> JSONL.

Runs single-process or under torchrun / accelerate launch (every rank computes a share of the
query batches, on a full copy of the model or on the cache job's FSDP2 / tensor-parallel
shards with ``parallel``; preconditions a share of the layers and scores a share of the row
chunks; rank 0 writes the results).
"""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr
from rich.table import Table

from grass_llm.influence.factors import load_factors
from grass_llm.influence.fisher import precondition
from grass_llm.influence.normalize import check_normalize, inverse, row_norms, scale_rows
from grass_llm.influence.query import QueryGrads, from_file, from_store
from grass_llm.influence.reader import resolve_device
from grass_llm.influence.score import ScoreRequest, score_store
from grass_llm.influence.texts import row_ids, row_texts, snippet
from grass_llm.influence.train_tokens import require_token_rows, train_token_scores
from grass_llm.parallel import comm
from grass_llm.store import GradientStore, open_store

__all__ = ["row_ids", "run_query", "write_ranked"]


def _entries(vals, idx, ids, texts, train_tokens=None) -> list[dict]:
    out = []
    for r, (v, i) in enumerate(zip(vals, idx, strict=True)):
        if i < 0:
            continue
        entry = {"rank": r + 1, "index": int(i), "id": ids[int(i)], "score": float(v),
                 "text": snippet(texts.get(int(i)))}
        if train_tokens is not None:
            t = train_tokens[r]
            entry["train_tokens"] = {"positions": t.positions.tolist(), "tokens": t.texts,
                                     "token_ids": t.token_ids, "scores": t.scores.tolist()}
        out.append(entry)
    return out


def _split(pre: dict[str, torch.Tensor], n_queries: int):
    return ({k: v[:n_queries] for k, v in pre.items()},
            {k: v[n_queries:] for k, v in pre.items()})


def run_query(console, store_url: str, *, queries: str | None, query_store: str | None,
              top_k: int, per_token: bool, token_mode: str, out: str, matrix: str | None,
              model: str | None, device: str = "auto", max_tokens: int | None = None,
              normalize: str = "none", train_tokens: bool = False, parallel: str = "none",
              progress=None) -> None:
    """The whole query command on this rank (call it on every rank)."""
    check_normalize(normalize)
    if (queries is None) == (query_store is None):
        raise ValueError("give exactly one of --queries or --query-store")
    if per_token and query_store is not None:
        raise ValueError("--per-token needs --queries (the model computes each token's "
                         "gradient)")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    dev = resolve_device(device)
    store = open_store(store_url)
    factors = load_factors(store)  # fails early and clearly when `fisher` was not run
    if train_tokens:
        require_token_rows(store)
    q = (from_store(store, open_store(query_store)) if query_store
         else from_file(store, queries, per_token=per_token, token_mode=token_mode,
                        model_path=model, device=dev, max_tokens=max_tokens,
                        parallel=parallel))
    rows = q.grads if q.tokens is None else {k: torch.cat([v, q.tokens[k]])
                                             for k, v in q.grads.items()}
    pre_q, pre_t = _split(precondition(factors, rows, device=dev), len(q.ids))
    arr = None
    with comm.guarded("creating the score matrix"):
        if matrix is not None and comm.rank() == 0:
            arr = zarr.create_array(matrix, shape=(len(q.ids), store.n_examples),
                                    dtype="float32", overwrite=True,
                                    chunks=(len(q.ids), store.layout.chunk_rows))
            arr.attrs.update({"store": store_url, "store_identity": store.identity,
                              "queries": q.ids, "normalize": normalize})
    if matrix is not None and comm.rank() != 0:
        arr = zarr.open_array(matrix, mode="r+")
    # cosine: every query (and its token rows, so that they add up to it) divided by the
    # query's norm over all layers
    q_norms = row_norms(pre_q) if normalize == "cosine" else None
    requests = {"queries": ScoreRequest(pre_q, top_k=top_k, matrix_out=arr, normalize=normalize,
                                        query_norms=q_norms)}
    if per_token:
        owner = np.repeat(np.arange(len(q.ids)), np.diff(q.offsets))
        requests["tokens"] = ScoreRequest(pre_t, top_k=top_k, normalize=normalize,
                                          query_norms=None if q_norms is None
                                          else q_norms.cpu()[torch.from_numpy(owner)])
    res = score_store(store, requests, device=dev, progress=progress)
    if res is None:
        return
    vals, idx = res["queries"].values, res["queries"].indices
    tok = res.get("tokens")
    every = [idx] if tok is None else [idx, tok.indices]
    ids = row_ids(store, np.concatenate([a.ravel() for a in every]))
    texts = row_texts(store, ids, tokenizer=q.tokenizer)  # only the reported rows' texts
    tt = None
    if train_tokens:  # only the reported examples' token rows, after the pass
        scored = pre_q if q_norms is None else scale_rows(pre_q, inverse(q_norms))
        tt = train_token_scores(store, scored, idx, normalize=normalize, tokenizer=q.tokenizer)
        found = [t for line in tt for t in line if t is not None]
        if found and all(t.token_ids is None for t in found):
            console.print("note: the store's tokenized corpus cache is not available: train "
                          "tokens are given by position only", highlight=False)
        elif found and q.tokenizer is None:
            console.print("note: no tokenizer at hand (--query-store): train tokens are given "
                          "as token ids", highlight=False)
    _write(q, res, ids, texts, out, normalize, tt, store.layout.token_mode)
    _show(console, q, vals, idx, ids, texts, out)


def _write(q: QueryGrads, res, ids, texts, out: str, normalize: str = "none",
           train_tokens=None, train_token_mode: str | None = None) -> None:
    vals, idx = res["queries"].values, res["queries"].indices
    tok = res.get("tokens")
    with open(out, "w") as f:
        for j, qid in enumerate(q.ids):
            line = {"query": qid, "normalize": normalize,
                    "top": _entries(vals[j], idx[j], ids, texts,
                                    None if train_tokens is None else train_tokens[j])}
            if train_tokens is not None:
                line["train_token_mode"] = train_token_mode
            if tok is not None:
                line["token_mode"] = q.token_mode
                line["tokens"] = [{"position": int(q.positions[r]), "token": q.token_texts[r],
                                   "top": _entries(tok.values[r], tok.indices[r], ids, texts)}
                                  for r in range(int(q.offsets[j]), int(q.offsets[j + 1]))]
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _show(console, q, vals, idx, ids, texts, out) -> None:
    table = Table(title=f"most influential training examples (all {len(q.ids)} queries in "
                        f"{out})")
    for col in ("query", "rank", "id", "score", "text"):
        table.add_column(col)
    for j, qid in enumerate(q.ids[:5]):
        for r in range(min(3, vals.shape[1])):
            if idx[j, r] < 0:
                continue
            i = int(idx[j, r])
            table.add_row(qid if r == 0 else "", str(r + 1), ids[i], f"{vals[j, r]:.4g}",
                          snippet(texts.get(i), 60) or "")
    console.print(table)


def write_ranked(console, store: GradientStore, scores: np.ndarray, out: str, *, key: str,
                 ranked: bool, show: int, title: str = "") -> np.ndarray:
    """One JSONL line per example (``ranked``: best first, with its rank; else row order), and
    a table of the ``show`` highest; returns the ranking (row indices, best first)."""
    ids = [str(i) for i in store.example_ids()]  # every row is written: O(n) is the output
    order = np.argsort(-scores, kind="stable")
    with open(out, "w") as f:
        for r, i in enumerate(order if ranked else range(len(ids))):
            line = {"rank": r + 1} if ranked else {}
            line.update({"index": int(i), "id": ids[i], key: float(scores[i])})
            f.write(json.dumps(line) + "\n")
    if show > 0:
        top = order[:show]
        texts = row_texts(store, {int(i): ids[i] for i in top})
        table = Table(title=title)
        for col in ("rank", "id", key.replace("_", "-"), "text"):
            table.add_column(col)
        for r, i in enumerate(top):
            table.add_row(str(r + 1), ids[i], f"{scores[i]:.4g}",
                          snippet(texts.get(int(i)), 80) or "")
        console.print(table)
    return order
