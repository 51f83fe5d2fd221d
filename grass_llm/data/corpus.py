"""A tokenized corpus built once, shared by every rank, memory-mapped.

``TokenizedCorpus.open_or_build(data, tokenizer, max_length=...)`` gives the same examples (ids,
token ids, labels, locations), skipped list and errors as
``tokenize_records(read_records(data).records, tokenizer, ...)``, but:

* **built once**: the result is cached under ``<cache root>/corpora/<key>/`` (cache root:
  ``cache_dir``, ``$GRASS_LLM_CACHE`` or ``~/.cache/grass_llm``); a resumed or repeated run
  opens it in seconds: the data's content hash is remembered under ``<cache root>/content/``
  by each file's path, size, times and inode (``grass_llm.data.content``), so an unchanged
  file is read once. The key covers the data's content
  (the file's bytes; every file's relative path and bytes for a directory), the tokenizer
  (``grass_llm.data.identity.tokenizer_fingerprint``: its definition, special tokens, chat
  template and output on a probe text), ``max_length``, ``overflow``, ``on_error``,
  ``add_eos``, ``add_bos`` and the special tokens they resolve to, and ``FORMAT_VERSION``. Not
  the path: a moved corpus reuses its cache (and locations name where it is now).
* **streamed**: the corpus is read in chunks and tokenized on every core; memory is a few
  chunks plus 16 bytes per record (the duplicate-id check; 32 for a moment while its sorted
  runs merge), never the corpus.
* **memory-mapped**: every rank maps the files and reads only the rows it uses.

Engine, chosen by measuring (SmolLM2 tokenizer, ~26-token documents, one thread, best of 7
on this project's shared 2-core machine): per document the Rust tokenizer takes ~38 us,
transformers' Python around a batched call ~5 us, and the per-record Python (parsing, the old
path's labels and windows, packing into arrays) ~15 us; a worker does in ~58 us what the old
path does in ~67 us (one tokenizer call per text).
A fast tokenizer's batch call (``TOKENIZERS_PARALLELISM``) runs only the Rust part on all
cores; the ~35% that is Python stays on one and caps the speed-up near 3x however many cores
there are (Amdahl). So chunks go to a pool of spawned worker processes (one per
core, each batching its chunk into one tokenizer call), which runs *all* of it in parallel,
with the very functions the old path uses (``readers.parse_chunk``,
``tokenize.tokenize_record``), so the two cannot drift apart; the main process only reads
bytes and applies results in order. Hugging Face ``datasets.map(num_proc=...)`` parallelizes
the same way but must first copy the raw corpus into Arrow through its own readers (other ids,
locations and error messages) and sees duplicates only within a shard; the files here are
plain NumPy arrays (int32 tokens + int64 offsets) mapped with ``np.memmap``, which is all the
per-rank reads need.

Layout of a corpus folder (n examples, N tokens; little-endian):

* ``tokens.i32`` int32 [N]: the token ids of all examples, concatenated.
* ``mask.u8`` uint8 [N]: 1 where the label is the token (a target), 0 where it is -100.
* ``offsets.i64`` int64 [n+1]: example i is tokens[offsets[i]:offsets[i+1]].
* ``lengths.i32`` int32 [n]; ``n_targets.i32`` int32 [n]: targets among positions 1.. of each
  example (position 0 is never predicted; the runner's ``token_mode="loss"`` counts these).
* ``ids.bin`` + ``ids_offsets.i64`` [n+1]: example ids, UTF-8; ``locs.bin`` +
  ``locs_offsets.i64``: their locations, without the corpus path.
* ``skipped.jsonl``: what was left out (reading problems first, then tokenizing ones, as
  ``read.skipped + tokenized.skipped``).
* ``meta.json``: counts, the fingerprint, the key and what it was computed from. Written last;
  the folder is built under a temporary name and renamed into place, so a killed build never
  leaves a folder that is trusted (its leftovers are removed by the next build on that host).

Distributed runs: every rank calls ``open_or_build``; rank 0 builds when the cache is missing
(inside ``comm.guarded``, so its error reaches every rank), the others wait, then all map the
files. This assumes the cache root is on a filesystem every rank of the run sees (a shared
home or ``$GRASS_LLM_CACHE``); the wait is bounded by the process group's timeout (30 minutes
from ``init_distributed``), so build a very large corpus beforehand in one process.

Workers are spawned, not forked (the caller may hold threads, CUDA, a process group): they
import the caller's main module again, so a script needs ``if __name__ == "__main__":`` (or
``num_proc=1``). See docs/corpus.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from grass_llm.data._corpus_build import SKIPPED_FILE, build
from grass_llm.data._corpus_folders import commit, remove_stale
from grass_llm.data._corpus_worker import absolute_location, from_utf8
from grass_llm.data.content import content_hash
from grass_llm.data.identity import tokenizer_fingerprint
from grass_llm.data.readers import resolve_format
from grass_llm.data.records import Skipped
from grass_llm.data.specials import Specials, special_tokens_record
from grass_llm.data.tokenize import IGNORE_INDEX, Example, check_tokenize_args

# 2: an assistant turn's template header is no longer a target (grass_llm.data.chat), and
# meta.json records the resolved special tokens.
FORMAT_VERSION = 2
META_FILE = "meta.json"
# name -> (file, dtype, length: "n" examples, "n+1", "N" tokens, or the size of a blob)
_ARRAYS = {"tokens": ("tokens.i32", "<i4", "N"), "mask": ("mask.u8", "u1", "N"),
           "offsets": ("offsets.i64", "<i8", "n+1"), "lengths": ("lengths.i32", "<i4", "n"),
           "n_targets": ("n_targets.i32", "<i4", "n"),
           "ids_offsets": ("ids_offsets.i64", "<i8", "n+1"),
           "locs_offsets": ("locs_offsets.i64", "<i8", "n+1"),
           "ids_blob": ("ids.bin", "u1", "ids"), "locs_blob": ("locs.bin", "u1", "locs")}
# Below this many bytes of data a pool's start-up (a few seconds) costs more than it saves.
_INLINE_BYTES = 4 << 20


class CorpusCacheError(ValueError):
    """A folder is not a usable tokenized corpus (missing, damaged, of another version)."""


class TokenizedCorpus:
    """A tokenized corpus on disk (see the module docstring); open with ``open`` or
    ``open_or_build``.

    Attributes:
        path: The corpus folder.
        key: Its cache key (the folder's name when built by ``open_or_build``).
        fingerprint: Hash (hex) of every example's id, token ids and labels, in order: differs
            when any of them differs; for the store's identity.
        n_examples, n_tokens, n_skipped: Counts.
        lengths: int32 [n], tokens per example (memory-mapped, as are the next ones).
        n_targets: int32 [n], target tokens among positions 1.. of each example.
        offsets: int64 [n+1]; tokens: int32 [N]; mask: uint8 [N] (see the layout).
        special_tokens: The special-token policy and what it resolved to
            (``grass_llm.data.specials.special_tokens_record``).
    """

    def __init__(self, path: Path, meta: dict, prefix: str):
        self.path, self.meta, self._prefix = path, meta, prefix
        self.key: str = meta["key"]
        self.fingerprint: str = meta["fingerprint"]
        self.n_examples: int = meta["n_examples"]
        self.n_tokens: int = meta["n_tokens"]
        self.n_skipped: int = meta["n_skipped"]
        self.special_tokens: dict = meta["special_tokens"]
        sizes = {"n": self.n_examples, "n+1": self.n_examples + 1, "N": self.n_tokens,
                 **meta["blob_bytes"]}
        arrays = {name: _map(path / file, dtype, sizes[size])
                  for name, (file, dtype, size) in _ARRAYS.items()}
        self.tokens, self.mask, self.offsets = arrays["tokens"], arrays["mask"], arrays["offsets"]
        self.lengths, self.n_targets = arrays["lengths"], arrays["n_targets"]
        self._ids = (arrays["ids_blob"], arrays["ids_offsets"])
        self._locs = (arrays["locs_blob"], arrays["locs_offsets"])
        self._skipped: list[Skipped] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, data: str | os.PathLike | None = None
             ) -> TokenizedCorpus:
        """Opens a corpus folder.

        Args:
            path: The folder (``corpus.path``).
            data: Where the corpus is now, for locations (default: where it was when built).

        Raises:
            CorpusCacheError: The folder is not a complete corpus of this version.
        """
        path = Path(path)
        meta = _read_meta(path)
        try:
            return cls(path, meta, str(Path(data)) if data is not None else meta["data"])
        except KeyError as err:
            raise CorpusCacheError(f"{path / META_FILE} lacks {err}: the corpus folder is "
                                   f"damaged; delete {path} to rebuild it") from None

    @classmethod
    def open_or_build(cls, data: str | os.PathLike, tokenizer, *, max_length: int,
                      overflow: str = "truncate", on_error: str = "error",
                      add_eos: bool | None = None, add_bos: bool | None = None,
                      format: str = "auto",
                      split: str | None = None, cache_dir: str | os.PathLike | None = None,
                      num_proc: int | None = None, progress: bool = True) -> TokenizedCorpus:
        """The tokenized corpus of ``data``, built on rank 0 if it is not cached yet. Call it on
        every rank (a no-op collective-wise in a single process).

        Args:
            data, format, split: The corpus, as for ``read_records``.
            tokenizer, max_length, overflow, on_error, add_eos, add_bos: As for
                ``tokenize_records``.
            cache_dir: The cache root (default ``$GRASS_LLM_CACHE`` or ``~/.cache/grass_llm``);
                the corpus goes to ``<cache_dir>/corpora/<key>/``.
            num_proc: Tokenizing processes (default: every core this process may use; the
                corpus is tokenized in this process when it is under 4 MiB).
            progress: Show a progress bar on rank 0 while building.

        Raises:
            DataError: A bad record or corpus, as ``read_records`` / ``tokenize_records`` raise
                it (on rank 0; the other ranks raise ``comm.RankFailure`` with its message).
            ValueError: An argument is out of range.
        """
        from grass_llm.parallel import comm

        check_tokenize_args(max_length, overflow, on_error)
        folder = None
        with comm.guarded("tokenizing the corpus"):
            if comm.rank() == 0:
                folder = str(_ensure_built(
                    Path(data), tokenizer, max_length=max_length, overflow=overflow,
                    on_error=on_error, add_eos=add_eos, add_bos=add_bos, format=format,
                    split=split, cache_dir=cache_dir, num_proc=num_proc, progress=progress))
        folder = comm.broadcast_object(folder)
        corpus = None
        with comm.guarded("opening the tokenized corpus"):
            corpus = cls.open(folder, data=data)
        return corpus

    def __len__(self) -> int:
        return self.n_examples

    def __repr__(self) -> str:
        return (f"TokenizedCorpus({str(self.path)!r}, n_examples={self.n_examples}, "
                f"n_tokens={self.n_tokens})")

    def example(self, i: int) -> Example:
        """Example ``i`` as ``grass_llm.data.Example`` (read from the maps)."""
        i = self._index(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.tokens[a:b]
        labels = np.where(self.mask[a:b].astype(bool), ids, IGNORE_INDEX)
        location = absolute_location(_string(*self._locs, i), self._prefix)
        return Example(_string(*self._ids, i), ids.tolist(), labels.tolist(), location)

    def examples(self, indices: Iterable[int]) -> list[Example]:
        return [self.example(i) for i in indices]

    def ids(self, a: int = 0, b: int | None = None) -> list[str]:
        """The ids of examples ``a..b-1`` (all by default)."""
        a, b, _ = slice(a, b).indices(self.n_examples)
        blob, offsets = self._ids
        if b <= a:
            return []
        ends = offsets[a:b + 1] - offsets[a]
        raw = bytes(blob[offsets[a]:offsets[b]])
        return [from_utf8(raw[ends[k]:ends[k + 1]]) for k in range(b - a)]

    def text(self, i: int, tokenizer) -> str:
        """The decoded tokens of example ``i`` (special tokens kept), e.g. for a snippet."""
        i = self._index(i)
        return tokenizer.decode(self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist())

    @property
    def skipped(self) -> list[Skipped]:
        """What was left out, with reasons (as ``read.skipped + tokenized.skipped``)."""
        if self._skipped is None:
            with open(self.path / SKIPPED_FILE, encoding="utf-8") as f:
                entries = [json.loads(line) for line in f]
            self._skipped = [Skipped(e["id"], absolute_location(e["location"], self._prefix),
                                     e["reason"]) for e in entries]
        return self._skipped

    def identity(self) -> dict:
        """What a store records about its data: ``{"fingerprint", "n_examples", "n_tokens",
        "corpus_key", "skipped_count"}`` — all derived from the content, so a moved corpus or
        cache keeps its identity (``path`` says where the cache is, if a store wants it)."""
        return {"fingerprint": self.fingerprint, "n_examples": self.n_examples,
                "n_tokens": self.n_tokens, "corpus_key": self.key,
                "skipped_count": self.n_skipped}

    def _index(self, i: int) -> int:
        if not -self.n_examples <= i < self.n_examples:
            raise IndexError(f"example {i} out of range (the corpus has {self.n_examples})")
        return int(i) % self.n_examples


def _map(path: Path, dtype: str, n: int) -> np.ndarray:
    """A read-only map of a file of ``n`` items (checked), or an empty array for n == 0."""
    expected = n * np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorpusCacheError(f"{path} is missing: the corpus folder is damaged; delete "
                               f"{path.parent} to rebuild it") from None
    if size != expected:
        raise CorpusCacheError(f"{path} has {size} bytes, expected {expected}: the corpus "
                               f"folder is damaged; delete {path.parent} to rebuild it")
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return from_utf8(bytes(blob[offsets[i]:offsets[i + 1]]))


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CorpusCacheError(f"{path} is not a tokenized corpus (no {META_FILE})") from None
    except ValueError as err:
        raise CorpusCacheError(f"{path / META_FILE} is damaged ({err}); delete {path} to "
                               "rebuild it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorpusCacheError(f"{path} is a tokenized corpus of format version "
                               f"{meta.get('format_version')}, this code reads "
                               f"{FORMAT_VERSION}; rebuild it")
    return meta


# ----------------------------------------------------------------------------- the cache


def corpus_key(data: Path, fmt: str, split: str | None, tokenizer, specials: Specials, *,
               max_length: int, overflow: str, on_error: str, add_eos: bool | None,
               add_bos: bool | None, hashes: Path | None = None) -> tuple[str, dict, int]:
    """The cache key of a tokenized corpus (hex), what it was computed from, and the data's
    size in bytes; ``hashes``: where content hashes are remembered (``content_hash``)."""
    content, nbytes = content_hash(data, cache=hashes)
    inputs = {"format_version": FORMAT_VERSION,
              "data": {"format": fmt, "split": split, "content": content},
              "tokenizer": tokenizer_fingerprint(tokenizer),
              "max_length": max_length, "overflow": overflow, "on_error": on_error,
              "add_eos": add_eos, "add_bos": add_bos,
              "specials": {"bos": specials.bos, "eos": specials.eos}}
    key = hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=16)
    return key.hexdigest(), inputs, nbytes


def _ensure_built(data: Path, tokenizer, *, max_length: int, overflow: str, on_error: str,
                  add_eos: bool | None, add_bos: bool | None, format: str,
                  split: str | None,
                  cache_dir, num_proc: int | None, progress: bool) -> Path:
    """The folder of the corpus, built first if it is not there (rank 0 only; no
    collectives)."""
    from grass_llm.models import cache_root

    fmt = resolve_format(data, format, split)
    specials = Specials.of(tokenizer, add_eos, add_bos)
    base = cache_root(None if cache_dir is None else str(cache_dir))
    key, inputs, nbytes = corpus_key(data, fmt, split, tokenizer, specials,
                                     max_length=max_length, overflow=overflow,
                                     on_error=on_error, add_eos=add_eos, add_bos=add_bos,
                                     hashes=base / "content")
    root = base / "corpora"
    folder = root / key
    if _complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    tmp = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"
    tmp.mkdir()
    try:
        if num_proc is None:
            num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
        if nbytes < _INLINE_BYTES:
            num_proc = 1
        t0 = time.perf_counter()
        counts = build(tmp, data, fmt, split, tokenizer, specials, max_length=max_length,
                       overflow=overflow, on_error=on_error, num_proc=num_proc,
                       progress=progress)
        meta = {"format_version": FORMAT_VERSION, "key": key, **counts,
                "blob_bytes": {"ids": (tmp / "ids.bin").stat().st_size,
                               "locs": (tmp / "locs.bin").stat().st_size},
                "data": str(data), "key_inputs": inputs,
                "special_tokens": special_tokens_record(tokenizer, add_bos=add_bos,
                                                        add_eos=add_eos),
                "build": {"seconds": round(time.perf_counter() - t0, 3), "num_proc": num_proc,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        commit(tmp, folder, _complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when committed
    return folder


def _complete(folder: Path) -> bool:
    try:
        TokenizedCorpus.open(folder)
    except (CorpusCacheError, OSError, ValueError, KeyError):
        return False
    return True


__all__ = ["FORMAT_VERSION", "CorpusCacheError", "TokenizedCorpus", "content_hash",
           "corpus_key"]
