"""``value --select``: the selected store rows written back as a training corpus.

A store row is an example of the tokenized corpus cache the store was built from (row i =
example i, ``meta["dataset"]["corpus_path"]``); an example is a record of the corpus file
(``meta["config"]["data"]``) or, for a document cut into windows (``overflow=chunk``), window
k of it, id ``<record id>#<k>``. A record is written when any of its examples is selected,
once, in corpus order.

Before anything is written the corpus must be the one the store was cached from: the cache
still there with the store's fingerprint (``meta["dataset"]["fingerprint"]``: every example's
id, tokens and labels), its rows' ids equal to the store's, and the corpus file's content hash
equal to the one the cache was built from. Otherwise a StoreError says what is gone or changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grass_llm.data.content import content_hash
from grass_llm.data.subset import SUFFIX, read_selected, write_subset
from grass_llm.influence.texts import row_ids, tokenized_corpus
from grass_llm.store import GradientStore, StoreError

SELECT_FORMATS = ("auto", "jsonl", "parquet", "hf", "ids")
_WINDOW = re.compile(r"(.*)#(\d+)")


@dataclass
class Selection:
    """What ``write_selection`` wrote: ``rows`` store rows as ``records`` records at ``path``
    in ``format``."""

    rows: int
    records: int
    path: Path
    format: str


def default_out(store: GradientStore, select_format: str) -> str:
    """``selected<suffix of the output format>`` (``selected_ids.txt`` for ids)."""
    if select_format == "ids":
        return "selected_ids.txt"
    if select_format != "auto":
        return "selected" + SUFFIX[select_format]
    corpus = tokenized_corpus(store)
    fmt = corpus.meta["key_inputs"]["data"]["format"] if corpus is not None else "jsonl"
    return "selected" + SUFFIX.get(fmt, "")


def write_selection(store: GradientStore, rows: np.ndarray, out: str,
                    select_format: str = "auto") -> Selection:
    """Write the records of the given store rows (best first or any order) at ``out``.

    Args:
        store: the valued store.
        rows: store row indices.
        out: the output file (a directory for a saved dataset or a text directory).
        select_format: ``auto`` (the corpus's own format), ``jsonl``, ``parquet``, ``hf``
            (a ``datasets`` dataset saved with ``save_to_disk``) or ``ids`` (the example
            ids, one a line, best first).

    Raises:
        StoreError: the corpus or its cache is gone or changed since the store was cached.
        ValueError: an unknown format, or one the corpus cannot be written as.
    """
    if select_format not in SELECT_FORMATS:
        raise ValueError(f"--select-format must be one of {list(SELECT_FORMATS)}, got "
                         f"{select_format!r}")
    ids = row_ids(store, rows)
    if select_format == "ids":
        _write_ids([ids[int(i)] for i in rows], Path(out))
        return Selection(len(rows), len(rows), Path(out), "ids")
    data, fmt, split = _check_corpus(store, ids)
    chunked = store.meta.get("config", {}).get("overflow") == "chunk"
    wanted = {ex: _candidates(ex, chunked) for ex in ids.values()}
    found = read_selected(data, {c for cs in wanted.values() for c in cs}, format=fmt,
                          split=split)
    have = {r.id for r in found}
    keep = set()
    for ex, cands in wanted.items():
        rid = next((c for c in cands if c in have), None)  # the id itself first, then a window
        if rid is None:
            raise StoreError(f"example {ex!r} has no record in {data}; the corpus changed "
                             "since the store was cached")
        keep.add(rid)
    records = [r for r in found if r.id in keep]
    path = write_subset(data, records, out, format=fmt, split=split,
                        out_format=None if select_format == "auto" else select_format)
    return Selection(len(ids), len(records), path, fmt if select_format == "auto"
                     else select_format)


def _candidates(example_id: str, chunked: bool) -> tuple[str, ...]:
    """The record ids an example id can come from: itself, and for a chunked corpus the id
    without a ``#<k>`` window suffix."""
    m = _WINDOW.fullmatch(example_id) if chunked else None
    return (example_id,) if m is None else (example_id, m.group(1))


def _check_corpus(store: GradientStore, ids: dict[int, str]) -> tuple[str, str, str | None]:
    """``(corpus file, format, split)`` once the corpus is known to be the store's own."""
    data = store.meta.get("config", {}).get("data") or store.meta.get("dataset", {}).get("path")
    cache = store.meta.get("dataset", {}).get("corpus_path")
    if not data or not cache:
        raise StoreError(f"{store.url} does not record its corpus and tokenized corpus cache "
                         "(a store of an older grass_llm); use --select-format ids")
    corpus = tokenized_corpus(store)
    if corpus is None:
        raise StoreError(f"the tokenized corpus cache {cache} of {store.url} is gone or "
                         "damaged; rerun `grass-llm cache` with the store's config to rebuild "
                         "it (no gradient is recomputed), or use --select-format ids")
    want = store.meta.get("dataset", {}).get("fingerprint")
    if corpus.fingerprint != want:
        raise StoreError(f"the tokenized corpus at {cache} is not the one {store.url} was "
                         f"cached from (fingerprint {corpus.fingerprint[:12]}..., the store "
                         f"records {str(want)[:12]}...)")
    for row, ex in ids.items():
        if corpus.ids(row, row + 1) != [ex]:
            raise StoreError(f"row {row} of {store.url} is {ex!r} but the tokenized corpus "
                             f"at {cache} has {corpus.ids(row, row + 1)}")
    if not Path(data).exists():
        raise StoreError(f"the corpus {data} that {store.url} was cached from is gone (moved "
                         "or deleted); the selection needs its records")
    built = corpus.meta["key_inputs"]["data"]
    if content_hash(Path(data))[0] != built["content"]:
        raise StoreError(f"the corpus {data} changed since {store.url} was cached (its "
                         "content hash differs); the selected rows would not be its records")
    return data, built["format"], built.get("split")


def _write_ids(ids: list[str], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(i + "\n" for i in ids))
    tmp.replace(out)
