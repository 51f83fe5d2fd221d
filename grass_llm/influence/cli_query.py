"""``grass-llm query``: query gradients -> preconditioned -> streamed top-k -> JSONL."""

from __future__ import annotations

import json

import zarr
from rich.table import Table

from grass_llm.influence.fisher import load_factors, precondition
from grass_llm.influence.query import from_file, from_store, snippet, training_texts
from grass_llm.influence.score import stream_top_k
from grass_llm.store import open_store


def _entries(vals, idx, ids, texts) -> list[dict]:
    return [{"rank": r + 1, "index": int(i), "id": ids[i], "score": float(v),
             "text": snippet(texts, ids[i])}
            for r, (v, i) in enumerate(zip(vals, idx)) if i >= 0]


def run_query(console, store_url: str, *, queries: str | None, query_store: str | None,
              top_k: int, per_token: bool, out: str, matrix: str | None,
              model: str | None) -> None:
    if (queries is None) == (query_store is None):
        raise ValueError("give exactly one of --queries or --query-store")
    if per_token and query_store is not None:
        raise ValueError("--per-token needs --queries (the model computes each token's "
                         "gradient)")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    store = open_store(store_url)
    factors = load_factors(store)  # fails early and clearly when `fisher` was not run
    q = (from_store(store, open_store(query_store)) if query_store
         else from_file(store, queries, per_token=per_token, model_path=model))
    pre = precondition(factors, q.grads)
    arr = None
    if matrix is not None:
        arr = zarr.create_array(matrix, shape=(len(q.ids), store.n_examples), dtype="float32",
                                chunks=(len(q.ids), store.layout.chunk_rows), overwrite=True)
        arr.attrs.update({"store": store_url, "store_identity": store.identity,
                          "queries": q.ids})
    vals, idx = stream_top_k(store, pre, top_k, matrix_out=arr)
    ids = [str(i) for i in store.example_ids()]
    texts = training_texts(store)
    tok_results = None
    if per_token:
        pre_tok = precondition(factors, q.tokens)
        tok_results = stream_top_k(store, pre_tok, top_k)
    with open(out, "w") as f:
        for j, qid in enumerate(q.ids):
            line = {"query": qid, "top": _entries(vals[j], idx[j], ids, texts)}
            if per_token:
                tv, ti = tok_results
                rows = []
                for r in range(int(q.offsets[j]), int(q.offsets[j + 1])):
                    rows.append({"position": int(q.positions[r]), "token": q.token_texts[r],
                                 "top": _entries(tv[r], ti[r], ids, texts)})
                line["tokens"] = rows
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    _show(console, q, vals, idx, ids, texts, out)


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
                          snippet(texts, ids[i], 60) or "")
    console.print(table)


