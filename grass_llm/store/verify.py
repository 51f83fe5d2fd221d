"""``grass-llm verify``: check that a store is complete and intact, its Fisher fit included.

The Fisher fit layout (written by ``grass_llm.influence.factors``): group ``fisher`` with
attribute ``current`` naming the fit in use; each fit is a group ``fisher/<fit-id>`` holding one
``[k, k]`` float64 array per layer (the lower Cholesky factor of ``F_l + lambda_l I``) and the
attributes ``complete``, ``identity`` (the store's), ``damping``, ``mode``, ``n`` and
``layers`` (per-layer report). A fit becomes current only once it is complete.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from zarr.core.sync import sync as zarr_sync

from grass_llm.store.rows import nonfinite_rows
from grass_llm.store.store import _ZARR_DTYPE, GradientStore, StoreError

FISHER_GROUP = "fisher"
CURRENT_ATTR = "current"


def fisher_problems(store: GradientStore, *, quick: bool = False) -> list[str]:
    """Problems of the store's current Fisher fit; none when no fit was ever started.

    Checks that the current fit exists, is complete, belongs to this store (identity) and has a
    ``[k, k]`` float64 factor for every layer; unless ``quick``, also that every factor decodes
    (checksums), is finite, lower triangular, with a positive diagonal.
    """
    if FISHER_GROUP not in store.group:
        return []
    fisher = store.group[FISHER_GROUP]
    fit_id = fisher.attrs.get(CURRENT_ATTR)
    if fit_id is None:
        return ["Fisher: no complete fit (an interrupted `grass-llm fisher`, or factors of an "
                "older grass_llm); rerun `grass-llm fisher`"]
    if fit_id not in fisher:
        return [f"Fisher: the current fit {fit_id!r} is missing; rerun `grass-llm fisher`"]
    fit = fisher[fit_id]
    if not fit.attrs.get("complete"):
        return [f"Fisher: the current fit {fit_id!r} is not complete; rerun `grass-llm fisher`"]
    if fit.attrs.get("identity") != store.identity:
        return [f"Fisher: the current fit {fit_id!r} belongs to another run (identity "
                "differs); rerun `grass-llm fisher`"]
    problems = []
    for lay in store.layout.layers:
        try:
            arr = fit[lay.name]
        except KeyError:
            problems.append(f"Fisher: no factor for layer {lay.name} in fit {fit_id!r}")
            continue
        if tuple(arr.shape) != (lay.k, lay.k) or str(arr.dtype) != "float64":
            problems.append(f"Fisher: factor {lay.name} has shape {tuple(arr.shape)} dtype "
                            f"{arr.dtype}, expected {(lay.k, lay.k)} float64")
        elif not quick:
            problems += _factor_problems(arr, lay.name)
    return problems


def _factor_problems(arr, name: str) -> list[str]:
    try:
        L = arr[:]
    except Exception as err:  # CRC32C mismatch, truncated file
        return [f"Fisher: factor {name} is unreadable ({type(err).__name__}: {err})"]
    if not np.isfinite(L).all():
        return [f"Fisher: factor {name} holds NaN/Inf"]
    if np.triu(L, 1).any() or not (np.diagonal(L) > 0).all():
        return [f"Fisher: factor {name} is not a Cholesky factor (lower triangular, positive "
                "diagonal)"]
    return []


def _expected_arrays(store: GradientStore) -> dict[str, tuple[tuple[int, ...], str]]:
    lay = store.layout
    n, dt = lay.n_examples, _ZARR_DTYPE[lay.dtype]
    out = {f"grads/{x.name}": ((n, x.k), dt) for x in lay.layers}
    out.update({"n_targets": ((n,), "int32"), "loss": ((n,), "float32"),
                "row_flags": ((n,), "uint8"), "chunk_done": ((lay.n_chunks,), "uint8")})
    if lay.token_mode is not None:
        n_tok = lay.n_token_rows()
        out.update({f"tokens/{x.name}": ((n_tok, x.k), dt) for x in lay.layers})
        out.update({"token_offsets": ((n + 1,), "int64"),
                    "token_chunk_base": ((lay.n_chunks,), "int64"),
                    "token_position": ((n_tok,), "int32")})
    return out


def verify_store(url: str, *, quick: bool = False, repair: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Check a store; returns a list of problems (empty = the store is complete and intact).

    Checks: format and attrs; every array's shape and dtype against the recorded layout; every
    row chunk marked done; unless ``quick``, every chunk file of a done row chunk exists (zarr
    reads a missing one as zeros, see ``_missing_chunk_files``), every chunk of every array
    decodes (CRC32C checksums catch truncated or corrupted files) and holds only finite values;
    example ids unique and complete; rows flagged non-finite at write time; the Fisher fit, if
    any (see ``fisher_problems``).

    With ``repair``, the row chunks whose data is missing or unreadable are marked not done, so
    that rerunning the same cache command recomputes exactly those.
    """
    try:
        store = GradientStore(url, mode="r")
    except StoreError as err:
        return [str(err)]
    problems: list[str] = []
    g = store.group
    for name, (shape, dtype) in _expected_arrays(store).items():
        try:
            arr = g[name]
        except KeyError:
            problems.append(f"array {name} is missing")
            continue
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            problems.append(f"array {name} has shape {tuple(arr.shape)} dtype {arr.dtype}, "
                            f"expected {shape} {dtype}")
    if "example_id" not in g:
        problems.append("array example_id is missing")
    if problems:
        return problems
    done = store.done_chunks()
    if not done.all():
        missing = np.nonzero(~done)[0]
        problems.append(f"{missing.size} of {done.size} row chunks are not complete (first: "
                        f"{missing[:8].tolist()}); rerun the same cache command to finish them")
    problems += fisher_problems(store, quick=quick)
    if quick:
        return problems
    lay = store.layout
    names = [f"grads/{x.name}" for x in lay.layers]
    if lay.token_mode is not None:
        names += [f"tokens/{x.name}" for x in lay.layers]
    problems_missing, broken = _missing_chunk_files(store, done)
    problems += problems_missing
    for i, name in enumerate(names):
        if progress is not None:
            progress(name, i, len(names))
        found, chunks = _check_array(store, name)
        problems += found
        broken |= chunks
    if broken:
        listed = sorted(broken)
        if repair:
            reopened = GradientStore(url, mode="r+")
            for c in listed:
                reopened.group["chunk_done"][c] = 0
            problems.append(f"repaired: row chunks {listed[:16]} marked not done; rerun the "
                            "same cache command to recompute them")
        else:
            problems.append(f"row chunks {listed[:16]} have missing or unreadable data; run "
                            "`grass-llm verify --repair` and rerun the same cache command to "
                            "recompute them")
    try:
        ids = g["example_id"][:]
    except Exception as err:  # a corrupted chunk surfaces as a codec error
        problems.append(f"example_id cannot be read: {err}")
    else:
        rows_done = np.repeat(done, lay.chunk_rows)[: lay.n_examples]
        ids = ids[rows_done]
        empty = int((ids == "").sum())
        if empty:
            problems.append(f"{empty} example id(s) are empty in complete chunks")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            problems.append(f"example ids are not unique: {uniq[counts > 1][:5].tolist()}")
    flags = g["row_flags"][:]
    if flags.any():
        bad = np.nonzero(flags & 1)[0]
        problems.append(f"{bad.size} row(s) had non-finite gradients at write time and are "
                        f"stored as zeros (rows {bad[:8].tolist()})")
    if lay.token_mode is not None:
        off = g["token_offsets"][:]
        if off[0] != 0 or (np.diff(off) < 0).any():
            problems.append("token_offsets are not non-decreasing from 0")
    return problems


def _missing_chunk_files(store: GradientStore, done: np.ndarray) -> tuple[list[str], set[int]]:
    """Done row chunks with a chunk file missing: problems, and those row chunks.

    zarr reads a chunk whose file is absent as its fill value, so a lost file (an interrupted
    copy of the store, a write lost in a crash) would read back as rows of zeros and pass every
    decode check. Every array a row chunk writes has all its chunk files written
    (``write_empty_chunks``), so each must exist. Not ``row_flags``: stores written before that
    policy have no file for an all-zero flags chunk, its normal content. One listing per array
    (a paged LIST on an object store), not one request per chunk."""
    lay = store.layout
    per_row = [f"grads/{x.name}" for x in lay.layers] + ["example_id", "n_targets", "loss"]
    per_token = []
    if lay.token_mode is not None:
        per_token = [f"tokens/{x.name}" for x in lay.layers] + ["token_position"]
    done_ids = np.nonzero(done)[0]
    token_owner: dict[int, int] = {}  # token chunk -> the row chunk whose rows it holds
    if per_token:
        TR = lay.token_chunk_rows
        for c in done_ids:
            s, e = lay.token_storage_range(int(c))
            token_owner.update({t: int(c) for t in range(s // TR, -(-e // TR))})
    out, broken = [], set()
    for names, owner in ((per_row, {int(c): int(c) for c in done_ids}), (per_token, token_owner)):
        for name in names:
            arr = store.group[name]
            present = _chunk_keys(arr)
            lost = [i for i in owner
                    if arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1)) not in present]
            if lost:
                rows = sorted({owner[i] for i in lost})
                out.append(f"{name}: {len(lost)} chunk file(s) of done row chunks are missing "
                           f"(row chunks {rows[:8]}); zarr would read them as zeros")
                broken |= set(rows)
    return out, broken


def _chunk_keys(arr) -> set[str]:
    """The keys present under ``arr`` in its store, relative to the array (chunk keys as
    ``arr.metadata.encode_chunk_key`` spells them, and its metadata)."""
    prefix = f"{arr.path}/" if arr.path else ""

    async def listed():
        return [key async for key in arr.store.list_prefix(prefix)]

    return {key[len(prefix):] for key in zarr_sync(listed())}


def _check_array(store: GradientStore, name: str) -> tuple[list[str], set[int]]:
    """Decode every chunk of one array: problems found, and the row chunks they belong to."""
    arr = store.group[name]
    lay = store.layout
    rows = arr.chunks[0]
    out, broken = [], set()
    for start in range(0, arr.shape[0], rows):
        try:
            block = arr[start: start + rows]
        except Exception as err:  # CRC32C mismatch, truncated file, bad codec stream
            out.append(f"{name}: chunk at row {start} is unreadable ({type(err).__name__}: "
                       f"{err})")
            broken.add(_row_chunk(lay, name, start))
            continue
        bad = nonfinite_rows(block, lay.dtype)
        if bad.any():
            out.append(f"{name}: {int(bad.sum())} row(s) with NaN/Inf from row {start} "
                       f"(first row {start + int(np.argmax(bad))})")
            broken.add(_row_chunk(lay, name, start))
    return out, broken


def _row_chunk(lay, name: str, start: int) -> int:
    if name.startswith("tokens/"):
        return int(np.searchsorted(lay.token_chunk_base(), start, side="right") - 1)
    return start // lay.chunk_rows
