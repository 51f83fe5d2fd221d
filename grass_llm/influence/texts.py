"""The training texts behind result rows, for readable snippets.

Only the texts of the ids asked for are kept. The corpus file is still read whole to find them
(``read_records`` has no random access); an index into the corpus (the tokenized-corpus cache)
will make this a read of the top-k documents only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


def training_texts(store: GradientStore, ids: Iterable[str] | None = None) -> dict[str, str]:
    """Record id -> text from the corpus the store records, for the given store example ids
    (all when None); empty when the corpus is no longer at its recorded path."""
    path = store.meta.get("config", {}).get("data")
    if not path or not Path(path).exists():
        return {}
    wanted = None if ids is None else {base_id(str(i)) for i in ids} | {str(i) for i in ids}
    try:
        records = read_records(path, on_error="skip").records
    except ValueError:
        return {}
    texts = {}
    for r in records:
        if wanted is not None and r.id not in wanted:
            continue
        t = record_text(r.fields)
        if t is not None:
            texts[r.id] = t
    return texts


def snippet(texts: dict[str, str], example_id: str, width: int = 240) -> str | None:
    """The text of a store row's record, whitespace collapsed, cut to ``width`` characters."""
    t = texts.get(example_id)
    if t is None:
        t = texts.get(base_id(example_id))
    if t is None:
        return None
    t = " ".join(t.split())
    return t if len(t) <= width else t[: width - 1] + "…"
