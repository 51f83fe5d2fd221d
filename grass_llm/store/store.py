"""Create, open, write and read a gradient store (layout in ``layout.py``).

Protocol for many writers (STYLE.md 4): rank 0 calls ``create_store`` (which creates the group,
its metadata and every array), the ranks synchronize, then each opens the store with
``open_store(path, mode="r+")`` and calls ``write_chunk`` for row chunks no other rank writes.
A chunk's data is written first (and fsync'ed on local disks), its ``chunk_done`` marker last, so
a killed run resumes from ``pending_chunks()`` and ends identical to an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync

import grass_llm
from grass_llm.store.layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    NONFINITE_POLICIES,
    StoreLayout,
)
from grass_llm.store.rows import decode_rows, encode_rows, to_numpy
from grass_llm.store.runid import (
    IDENTITY_VERSION,
    canonical,
    merged_meta,
    new_session,
    describe_diff,
    store_identity,
)

_ZARR_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


class StoreError(Exception):
    """A store cannot be used as asked (wrong format, mismatched run, incomplete...)."""


class StoreMismatchError(StoreError):
    """The store was written by a different run configuration."""


class NonFiniteGradientError(StoreError):
    """A gradient row holds NaN/Inf (or overflows the storage dtype)."""


def _exists(url: str) -> bool:
    try:
        zarr.open_group(url, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False


def create_store(url: str | os.PathLike, layout: StoreLayout, meta: Mapping, *,
                 execution: Mapping | None = None, overwrite: bool = False) -> GradientStore:
    """Create a store (rank 0 only), or reopen it for resuming when it is the same run.

    Args:
        url: a local path or an fsspec URL (``memory://``, ``s3://`` where installed, ...).
        layout: shapes, chunking, dtype.
        meta: the run's identity: everything that changes the numbers (resolved config fields,
            model/tokenizer/dataset hashes, loss reduction...); JSON-serializable. A rerun
            resumes only when layout and meta are equal.
        execution: how this session runs (paths, batch budget, sharding...): appended to the
            store's ``sessions`` on every create or resume, free to change between sessions.
            ``store.meta`` shows the identity meta with the latest session's execution laid over
            it (same keys, one level deep).
        overwrite: replace a store of a different run instead of raising.

    Raises:
        StoreMismatchError: a store of another run exists at ``url`` and overwrite is False.
    """
    url = str(url)
    meta = json.loads(canonical(meta))  # what the store will hold, exactly
    ident = store_identity(layout, meta)
    session = new_session(execution)
    if _exists(url):
        existing = GradientStore(url, mode="r+")
        if existing.identity == ident:
            sessions = list(existing.attrs.get("sessions", [])) + [session]
            existing.group.attrs["sessions"] = sessions
            return GradientStore(url, mode="r+")
        if existing.attrs.get("identity_version") != IDENTITY_VERSION and not overwrite:
            raise StoreMismatchError(
                f"{url} was written by an older grass_llm (run identity scheme "
                f"{existing.attrs.get('identity_version', 1)}, this one uses "
                f"{IDENTITY_VERSION}), so it cannot be resumed; finish it with that version, "
                "or pass --overwrite to replace it")
        if not overwrite:
            raise StoreMismatchError(
                f"{url} holds a store of a different run ({describe_diff(existing, layout, meta)})"
                "; rerun with the same configuration to resume it, or pass --overwrite to "
                "replace it")
    group = zarr.open_group(url, mode="w")
    compressors = [ZstdCodec(level=3), Crc32cCodec()] if layout.codec == "zstd" \
        else [Crc32cCodec()]
    n, R = layout.n_examples, layout.chunk_rows
    for lay in layout.layers:
        group.create_array(f"grads/{lay.name}", shape=(n, lay.k), chunks=(R, lay.k),
                           dtype=_ZARR_DTYPE[layout.dtype], compressors=compressors,
                           fill_value=0)
    group.create_array("example_id", shape=(n,), chunks=(R,), dtype=str,
                       compressors=[Crc32cCodec()])
    group.create_array("n_targets", shape=(n,), chunks=(R,), dtype="int32",
                       compressors=compressors, fill_value=0)
    group.create_array("loss", shape=(n,), chunks=(R,), dtype="float32",
                       compressors=compressors, fill_value=0)
    group.create_array("row_flags", shape=(n,), chunks=(R,), dtype="uint8",
                       compressors=compressors, fill_value=0)
    group.create_array("chunk_done", shape=(layout.n_chunks,), chunks=(1,), dtype="uint8",
                       compressors=[Crc32cCodec()], fill_value=0)
    if layout.token_mode is not None:
        n_tok, TR = layout.n_token_rows(), layout.token_chunk_rows
        for lay in layout.layers:
            group.create_array(f"tokens/{lay.name}", shape=(n_tok, lay.k), chunks=(TR, lay.k),
                               dtype=_ZARR_DTYPE[layout.dtype], compressors=compressors,
                               fill_value=0)
        for name, values in (("token_offsets", layout.token_offsets()),
                             ("token_chunk_base", layout.token_chunk_base())):
            arr = group.create_array(name, shape=values.shape, chunks=values.shape,
                                     dtype="int64", compressors=[Crc32cCodec()])
            arr[:] = values
        group.create_array("token_position", shape=(n_tok,), chunks=(TR,), dtype="int32",
                           compressors=compressors, fill_value=-1)
    group.attrs.update({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "grass_llm_version": grass_llm.__version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "layout": layout.to_attrs(), "meta": meta, "identity": ident,
        "identity_version": IDENTITY_VERSION, "sessions": [session],
    })
    return GradientStore(url, mode="r+")


def open_store(url: str | os.PathLike, mode: str = "r") -> GradientStore:
    """Open an existing store for reading (``"r"``) or for writing chunks (``"r+"``)."""
    return GradientStore(str(url), mode=mode)


class GradientStore:
    """An open gradient store. Rows are returned as float32 numpy arrays."""

    def __init__(self, url: str, mode: str = "r"):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.url, self.mode = url, mode
        try:
            self.group = zarr.open_group(url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(f"no gradient store at {url}") from err
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{url} is a Zarr group but not a grass_llm gradient store "
                             f"(attrs['format'] = {self.attrs.get('format')!r})")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} has store format version {self.attrs.get('format_version')}"
                             f"; this grass_llm reads version {FORMAT_VERSION}")
        counts = None
        if self.attrs["layout"].get("token_mode") is not None:
            counts = tuple(int(v) for v in np.diff(self.group["token_offsets"][:]))
        self.layout = StoreLayout.from_attrs(self.attrs["layout"], counts)
        self.identity = self.attrs["identity"]
        self.sessions = list(self.attrs.get("sessions", []))
        self.meta = merged_meta(self.attrs.get("meta", {}),
                            self.sessions[-1] if self.sessions else {})
        self._local_root = _local_root(self.group)
        self._arrays: dict[str, zarr.Array] = {}

    # --------------------------------------------------------------------------- reading
    @property
    def layer_names(self) -> list[str]:
        return [lay.name for lay in self.layout.layers]

    @property
    def n_examples(self) -> int:
        return self.layout.n_examples

    def done_chunks(self) -> np.ndarray:
        """``[n_chunks]`` bool: which row chunks are complete."""
        return self.group["chunk_done"][:].astype(bool)

    def require_complete(self) -> None:
        """Raise StoreError unless every row chunk is written (Fisher and scores need all)."""
        done = self.done_chunks()
        if not done.all():
            raise StoreError(f"{self.url} is incomplete ({int((~done).sum())} chunks missing); "
                             "finish `grass-llm cache` first")

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Incomplete chunks assigned to ``rank`` (round robin), in order."""
        done = self.done_chunks()
        return [c for c in range(rank, self.layout.n_chunks, world_size) if not done[c]]

    def read_rows(self, layer: str, start: int, stop: int) -> np.ndarray:
        """Gradient rows ``[stop - start, k]`` of one layer as float32."""
        return decode_rows(self.layout.dtype, self.array(f"grads/{layer}")[start:stop])

    def read_example_tokens(self, layer: str, i: int) -> np.ndarray:
        """Example i's per-token rows ``[n_tokens_i, k]`` of one layer as float32."""
        if self.layout.token_mode is None:
            raise StoreError(f"{self.url} has no per-token rows (written without token mode)")
        s, e = self.layout.example_token_rows(i)
        return decode_rows(self.layout.dtype, self.group[f"tokens/{layer}"][s:e])

    def read_chunk_tokens(self, layer: str, c: int) -> np.ndarray:
        """All token rows of row chunk c (its examples in order) ``[n, k]`` as float32."""
        if self.layout.token_mode is None:
            raise StoreError(f"{self.url} has no per-token rows (written without token mode)")
        s, e = self.layout.token_storage_range(c)
        return decode_rows(self.layout.dtype, self.group[f"tokens/{layer}"][s:e])

    def array(self, name: str) -> zarr.Array:
        """An array of the store, opened once (opening reads its metadata from storage)."""
        arr = self._arrays.get(name)
        if arr is None:
            # Every chunk is written, even one that equals the fill value: zarr's default
            # compares each chunk with it first (a pass over the data) and then skips the file.
            arr = self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return arr

    def read_raw(self, layer: str, start: int, stop: int) -> np.ndarray:
        """Stored rows as they are on disk: float16, uint16 (bfloat16 bits) or float32."""
        return self.array(f"grads/{layer}")[start:stop]

    def read_rows_torch(self, layer: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[stop - start, k]`` as a float32 tensor, with one conversion pass at most."""
        raw = self.read_raw(layer, start, stop)
        if self.layout.dtype == "bfloat16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
        t = torch.from_numpy(raw)
        return t if t.dtype == torch.float32 else t.float()

    def example_ids(self) -> np.ndarray:
        return self.group["example_id"][:]

    # --------------------------------------------------------------------------- writing
    def write_chunk(self, c: int, grads: Mapping[str, np.ndarray | torch.Tensor],
                    example_ids, n_targets, loss, *, token_grads=None, token_positions=None,
                    nonfinite: str = "fail") -> None:
        """Write row chunk ``c`` completely, then mark it done.

        Args:
            c: row chunk index (rows ``layout.chunk_range(c)``).
            grads: ``{layer: [R, k]}`` for every layer of the layout.
            example_ids, n_targets, loss: ``[R]`` each.
            token_grads: token mode: ``{layer: [n_rows_of_chunk, k]}`` (rows of the chunk's
                examples, concatenated in order); token_positions ``[n_rows_of_chunk]``.
            nonfinite: ``"fail"`` raises ``NonFiniteGradientError`` naming the examples;
                ``"record"`` stores such rows as zeros and sets bit 0 of ``row_flags``.
        """
        if self.mode != "r+":
            raise StoreError("store opened read-only; open with mode='r+' to write")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}")
        a, b = self.layout.chunk_range(c)
        R = b - a
        ids = np.asarray([str(i) for i in example_ids], dtype=object)
        if ids.shape != (R,):
            raise ValueError(f"chunk {c} has {R} rows, got {ids.shape[0]} example ids")
        bad = np.zeros(R, dtype=bool)
        encoded = {}
        for lay in self.layout.layers:
            if lay.name not in grads:
                raise ValueError(f"chunk {c}: no gradients for layer {lay.name}")
            rows, row_bad = encode_rows(self.layout.dtype, grads[lay.name], (R, lay.k),
                                        f"layer {lay.name}")
            encoded[lay.name] = rows
            bad |= row_bad
        tok_encoded = self._encode_tokens(c, token_grads, token_positions, bad)
        if bad.any():
            if nonfinite == "fail":
                raise NonFiniteGradientError(
                    f"chunk {c}: non-finite gradient (NaN/Inf, or too large for "
                    f"{self.layout.dtype}) for example id(s) {list(ids[bad][:10])}")
            for rows in encoded.values():
                rows[bad] = 0
        paths = [f"grads/{name}/c/{c}/0" for name in encoded]
        if tok_encoded is not None:
            paths += self._write_tokens(c, *tok_encoded)
        meta = {"example_id": ids.astype(str),
                "n_targets": np.asarray(n_targets, dtype=np.int32).reshape(R),
                "loss": np.asarray(to_numpy(loss), dtype=np.float32).reshape(R),
                "row_flags": bad.astype(np.uint8)}
        self._write_all([(f"grads/{name}", rows) for name, rows in encoded.items()]
                        + list(meta.items()), slice(a, b))
        paths += [f"{n}/c/{c}" for n in meta]
        self._fsync(paths)
        self.group["chunk_done"][c] = 1  # last: the chunk counts only once all of it is on disk
        self._fsync([f"chunk_done/c/{c}"])

    def _write_all(self, items: list[tuple[str, np.ndarray]], rows: slice) -> None:
        """``array[rows] = values`` for every ``(array, values)``, as concurrent writes in one
        round trip to zarr's event loop: one chunk's ~30 arrays written one by one spend more
        time handing each write to that loop than writing it."""
        arrays = [self.array(name).async_array for name, _ in items]  # opened outside the loop

        async def put_all():
            await asyncio.gather(*(arr.setitem(rows, values)
                                   for arr, (_, values) in zip(arrays, items)))

        zarr_sync(put_all())

    def _encode_tokens(self, c, token_grads, token_positions, bad):
        if self.layout.token_mode is None:
            if token_grads is not None:
                raise ValueError("this store has no token mode; token_grads must be None")
            return None
        if token_grads is None or token_positions is None:
            raise ValueError("token-mode store: give token_grads and token_positions")
        a, b = self.layout.chunk_range(c)
        off = self.layout.token_offsets()
        n_rows = int(off[b] - off[a])
        pos = np.asarray(to_numpy(token_positions), dtype=np.int32).reshape(-1)
        if pos.shape != (n_rows,):
            raise ValueError(f"chunk {c}: expected {n_rows} token positions, got {pos.shape[0]}")
        enc = {}
        for lay in self.layout.layers:
            rows, row_bad = encode_rows(self.layout.dtype, token_grads[lay.name],
                                        (n_rows, lay.k), f"tokens of layer {lay.name}")
            if row_bad.any():  # a bad token row flags its example
                ex = np.searchsorted(off[a:b + 1], np.nonzero(row_bad)[0] + off[a], "right") - 1
                bad[ex] = True
            enc[lay.name] = rows
        return enc, pos, bad

    def _write_tokens(self, c, enc, pos, bad) -> list[str]:
        a, b = self.layout.chunk_range(c)
        off = self.layout.token_offsets()
        s, e = self.layout.token_storage_range(c)
        ex_of_row = np.repeat(np.arange(b - a), np.diff(off[a:b + 1]))
        paths = []
        TR = self.layout.token_chunk_rows
        for name, rows in enc.items():
            rows[bad[ex_of_row]] = 0
            self.array(f"tokens/{name}")[s:e] = rows
            paths += [f"tokens/{name}/c/{t}/0" for t in range(s // TR, -(-e // TR))]
        self.array("token_position")[s:e] = pos
        paths += [f"token_position/c/{t}" for t in range(s // TR, -(-e // TR))]
        return paths

    def _fsync(self, keys: list[str]) -> None:
        """Make written chunk files durable on local disks (object stores are durable on PUT):
        each file, then the directories holding its entry and its folder's (a chunk's folder
        ``c/<chunk>`` is new with the chunk, and zarr writes each file by a rename), so that a
        crash after the ``chunk_done`` marker cannot lose a file whose contents were synced.
        POSIX makes a new directory entry durable only through its directory."""
        if self._local_root is None:
            return
        folders: dict[str, None] = {}
        for key in keys:
            path = self._local_root / key
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # an all-fill-value chunk zarr chose not to write
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(key)
            folders.update({parent: None, os.path.dirname(parent): None})
        for folder in folders:
            fd = os.open(self._local_root / folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _local_root(group: zarr.Group) -> Path | None:
    root = getattr(group.store, "root", None)
    if root is None:
        return None
    return Path(root) / group.path if group.path else Path(root)
