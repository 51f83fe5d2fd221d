"""On-disk and in-memory structures of a tokenized corpus being built: the files
(``Tables``), their streamed fingerprint, and the set of id hashes behind the duplicate check.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from grass_llm.data._corpus_worker import ChunkResult, Strings, from_utf8


class HashIndex:
    """A set of (64-bit hash, row) pairs kept as a few sorted runs (merged when a newer one grows
    to half an older one's size, so there are O(log n) runs and adding is O(log n) amortized per
    key): a vectorized "which of these hashes were seen" in 16 bytes per key (twice that for
    the moment the two largest runs merge)."""

    def __init__(self):
        self._keys: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(k) for k in self._keys)

    def hits(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: which ``keys`` are in the set."""
        hit = np.zeros(len(keys), bool)
        for run in self._keys:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            hit |= run[at] == keys
        return hit

    def rows(self, key) -> list[int]:
        """The rows added with hash ``key`` (more than one only after a hash collision)."""
        out = []
        for run, rows in zip(self._keys, self._rows):
            key = np.uint64(key)
            lo, hi = np.searchsorted(run, key, "left"), np.searchsorted(run, key, "right")
            out.extend(int(r) for r in rows[lo:hi])
        return out

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._keys.append(keys[order])
        self._rows.append(np.asarray(rows, np.int64)[order])
        while len(self._keys) > 1 and len(self._keys[-2]) < 2 * len(self._keys[-1]):
            new_keys, new_rows = self._keys.pop(), self._rows.pop()
            # A merge of two sorted runs: the result is the only new array of the old one's
            # size (a concatenate + argsort would take about three).
            at = np.searchsorted(self._keys[-1], new_keys, side="right")
            self._keys[-1] = np.insert(self._keys[-1], at, new_keys)
            self._rows[-1] = np.insert(self._rows[-1], at, new_rows)


class StrTable:
    """Append-only strings on disk: ``<name>.bin`` (UTF-8, concatenated) and
    ``<name>_offsets.i64`` (int64 [n+1], string i is bytes offsets[i]:offsets[i+1])."""

    def __init__(self, folder: Path, name: str, on_write=None):
        self.blob = open(folder / f"{name}.bin", "w+b")  # read back by get()
        self.offsets = open(folder / f"{name}_offsets.i64", "w+b")
        self.n, self.size, self._on_write = 0, 0, on_write
        self._write(self.offsets, np.zeros(1, "<i8"), "offsets")

    def _write(self, f, data, part: str) -> None:
        data = memoryview(data).cast("B")
        f.write(data)
        if self._on_write is not None:
            self._on_write(part, data)

    def append(self, strings: Strings) -> None:
        self._write(self.blob, strings.blob, "blob")
        self._write(self.offsets, (self.size + np.cumsum(strings.lengths)).astype("<i8"),
                    "offsets")
        self.size += len(strings.blob)
        self.n += len(strings)

    def get(self, i: int) -> str:
        """String ``i`` (read back from disk: for the rare exact comparison)."""
        self.blob.flush()
        self.offsets.flush()
        a, b = np.frombuffer(os.pread(self.offsets.fileno(), 16, 8 * i), "<i8")
        return from_utf8(os.pread(self.blob.fileno(), int(b - a), int(a)))

    def close(self) -> None:
        self.blob.close()
        self.offsets.close()


class Fingerprint:
    """A streamed hash of the example ids, token ids and labels, in order (hex): the token ids,
    the target mask (which with them gives the labels), the example boundaries and the ids,
    each hashed as the bytes written to the files."""

    PARTS = ("ids.blob", "ids.offsets", "tokens", "mask", "offsets")

    def __init__(self):
        self._h = {p: hashlib.blake2b(digest_size=16) for p in self.PARTS}

    def update(self, name: str, data) -> None:
        self._h[name].update(memoryview(data).cast("B"))

    def hexdigest(self) -> str:
        h = hashlib.blake2b(b"grass_llm tokenized corpus v1", digest_size=16)
        for name in self.PARTS:
            h.update(name.encode() + self._h[name].digest())
        return h.hexdigest()


class Tables:
    """The files of a corpus being built (see ``grass_llm.data.corpus`` for the layout)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fingerprint = Fingerprint()
        self.ids = StrTable(folder, "ids",
                            lambda part, data: self.fingerprint.update(f"ids.{part}", data))
        self.locs = StrTable(folder, "locs")
        self.rec_ids = StrTable(folder, "build_record_ids")  # every candidate record: for the
        self.rec_locs = StrTable(folder, "build_record_locs")  # exact duplicate check
        self._files = {name: open(folder / name, "wb") for name in
                       ("tokens.i32", "mask.u8", "offsets.i64", "lengths.i32", "n_targets.i32")}
        self.n_tokens = 0
        self._put("offsets.i64", np.zeros(1, "<i8"), "offsets")

    def _put(self, name: str, data: np.ndarray, part: str | None = None) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        self._files[name].write(view)
        if part is not None:
            self.fingerprint.update(part, view)

    def add_examples(self, r: ChunkResult, keep: np.ndarray | None) -> None:
        """Appends the chunk's examples (those where ``keep``, all when it is None)."""
        tokens, mask, lengths, n_targets = r.tokens, r.mask, r.lengths, r.n_targets
        ids, locs = r.ex_ids, r.ex_locs
        if keep is not None:
            per_token = np.repeat(keep, lengths)
            tokens, mask = tokens[per_token], mask[per_token]
            lengths, n_targets = lengths[keep], n_targets[keep]
            ids, locs = ids.select(keep), locs.select(keep)
        self._put("tokens.i32", tokens, "tokens")
        self._put("mask.u8", mask, "mask")
        self._put("lengths.i32", lengths)
        self._put("n_targets.i32", n_targets)
        self._put("offsets.i64", (self.n_tokens + np.cumsum(lengths)).astype("<i8"), "offsets")
        self.n_tokens += int(lengths.sum())
        self.ids.append(ids)
        self.locs.append(locs)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        for table in (self.ids, self.locs, self.rec_ids, self.rec_locs):
            table.close()
