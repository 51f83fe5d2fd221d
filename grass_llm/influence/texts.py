"""The training texts behind result rows, for readable snippets: only the reported rows.

Two sources, best first:

1. The tokenized corpus cache (``grass_llm.data.corpus.TokenizedCorpus``) when the store
   records its folder (``meta["dataset"]["corpus_path"]``) and a tokenizer is at hand: only the
   reported rows are read from its memory maps and decoded (a window of a chunked document is
   its own text). Store row i is corpus example i; the ids of the rows read are checked against
   the store's.
2. Otherwise the corpus file at the store's recorded path, read whole (no random access into
   it); only the texts of the reported rows' records are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from grass_llm.data import read_records
from grass_llm.store import GradientStore


def base_id(example_id: str) -> str:
    """The record id of a store row: ``"<id>#<k>"`` (window k of a chunked document) -> id."""
    return example_id.split("#", 1)[0]


def record_text(fields: dict) -> str | None:
    """A record's text as a reader would see it (text, prompt + completion, or messages)."""
    if "text" in fields:
        return str(fields["text"])
    if "prompt" in fields:
        return f"{fields.get('prompt', '')}{fields.get('completion', '')}"
    if "messages" in fields:
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in fields["messages"])
    return None


def row_texts(store: GradientStore, ids: Mapping[int, str], *,
              tokenizer=None) -> dict[int, str]:
    """Texts of the given store rows (``{row: example id}``, e.g. from ``row_ids``):
    ``{row: text}``; rows whose text cannot be found are left out."""
    if not ids:
        return {}
    texts = _from_tokenized_corpus(store, ids, tokenizer)
    if texts is not None:
        return texts
    by_record = _from_corpus_file(store, ids.values())
    out = {}
    for row, ex_id in ids.items():
        t = by_record.get(ex_id, by_record.get(base_id(ex_id)))
        if t is not None:
            out[row] = t
    return out


def tokenized_corpus(store: GradientStore):
    """The store's tokenized corpus cache (``meta["dataset"]["corpus_path"]``) when it is still
    there and has the store's number of examples, else None. Callers check the ids of the rows
    they read against the store's (``corpus.ids(i, i + 1)``)."""
    path = store.meta.get("dataset", {}).get("corpus_path")
    if not path or not Path(path).is_dir():
        return None
    from grass_llm.data.corpus import CorpusCacheError, TokenizedCorpus

    try:
        corpus = TokenizedCorpus.open(path)
    except (CorpusCacheError, OSError):
        return None
    return corpus if corpus.n_examples == store.n_examples else None


def _from_tokenized_corpus(store, ids: Mapping[int, str], tokenizer) -> dict[int, str] | None:
    corpus = None if tokenizer is None else tokenized_corpus(store)
    if corpus is None:
        return None
    out = {}
    for row, ex_id in ids.items():
        if corpus.ids(row, row + 1) != [ex_id]:
            return None  # not the corpus these rows were cached from
        out[row] = corpus.text(row, tokenizer)
    return out


def _from_corpus_file(store, ids: Iterable[str]) -> dict[str, str]:
    """Record id -> text of the wanted records, from the corpus file (read whole)."""
    path = store.meta.get("config", {}).get("data")
    if not path or not Path(path).exists():
        return {}
    wanted = {base_id(str(i)) for i in ids} | {str(i) for i in ids}
    try:
        records = read_records(path, on_error="skip").records
    except ValueError:
        return {}
    return {r.id: t for r in records if r.id in wanted
            for t in [record_text(r.fields)] if t is not None}


def row_ids(store: GradientStore, rows) -> dict[int, str]:
    """Example ids of the given store rows only (not the whole id column): ``{row: id}``."""
    uniq = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    uniq = uniq[uniq >= 0]
    if uniq.size == 0:
        return {}
    ids = store.array("example_id").get_coordinate_selection(uniq)
    return {int(r): str(i) for r, i in zip(uniq, ids, strict=True)}


def snippet(text: str | None, width: int = 240) -> str | None:
    """``text`` with whitespace collapsed, cut to ``width`` characters."""
    if text is None:
        return None
    t = " ".join(text.split())
    return t if len(t) <= width else t[: width - 1] + "…"
