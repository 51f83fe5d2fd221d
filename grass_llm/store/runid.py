"""A store's run identity and sessions: what must match for a rerun to resume a store (the
layout and the identity meta: what changes the numbers), the per-session execution records
laid over it in ``store.meta``, and the message that says what differs."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping

import numpy as np

import grass_llm
from grass_llm.store.layout import StoreLayout


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# How ``store_identity`` is computed; a store written under another scheme cannot be resumed.
IDENTITY_VERSION = 2


def store_identity(layout: StoreLayout, meta: Mapping) -> str:
    """Hash of everything that must match for a rerun to resume this store: the layout and the
    identity ``meta`` (what changes the numbers). Execution details (paths, batch budget,
    sharding, code version) are session records, not part of it."""
    h = hashlib.sha256()
    h.update(canonical({"layout": layout.to_attrs(), "meta": meta,
                         "identity_version": IDENTITY_VERSION}).encode())
    if layout.token_counts:  # millions of ints: hashed as bytes, not through JSON
        h.update(np.asarray(layout.token_counts, dtype=np.int64).tobytes())
    return h.hexdigest()


def new_session(execution: Mapping | None) -> dict:
    return {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "grass_llm_version": grass_llm.__version__, **json.loads(canonical(execution or {}))}


def merged_meta(meta: Mapping, session: Mapping) -> dict:
    """The identity meta with the latest session's execution details laid over it (one level
    deep: ``config``, ``model``, ``dataset``... gain their execution keys)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in meta.items()}
    for key, value in session.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        elif key not in out:
            out[key] = value
    return out


def describe_diff(existing, layout: StoreLayout, meta: Mapping) -> str:
    diffs = []
    old_layout = existing.attrs["layout"]
    for key, value in layout.to_attrs().items():
        if old_layout.get(key) != value:
            diffs.append(f"layout.{key}")
    old_meta = existing.attrs.get("meta", {})
    absent = False
    for key in sorted(set(old_meta) | set(meta)):
        old, new = old_meta.get(key, _ABSENT), meta.get(key, _ABSENT)
        if canonical(old) == canonical(new):
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the field: meta.config.seed
            subs = [sub for sub in sorted(set(old) | set(new))
                    if sub not in old or sub not in new
                    or canonical(old[sub]) != canonical(new[sub])][:5]
            diffs += [f"meta.{key}.{sub} ({_short(old.get(sub, _ABSENT))} -> "
                      f"{_short(new.get(sub, _ABSENT))})" for sub in subs]
            absent = absent or any(sub not in old for sub in subs)
        else:
            diffs.append(f"meta.{key}")
            absent = absent or old is _ABSENT
    if not diffs:
        diffs.append("token counts")
    note = ("; absent: the store was written by an older version, before that field "
            "existed") if absent else ""
    return "differs in " + ", ".join(diffs) + note


class _Absent:
    """A field one side of a comparison does not have (shown as ``absent``)."""

    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"
