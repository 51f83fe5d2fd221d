"""Building a tokenized corpus (``grass_llm.data.corpus``): chunks of the corpus are parsed and
tokenized in worker processes (``tokenize_chunk``), and applied in file order in the main
process (``Sequencer``), which checks what needs the whole corpus (duplicate ids), applies the
``on_error`` policy exactly as ``read_records`` + ``tokenize_records`` do, and appends the
examples to flat files (``Tables``).

Memory is bounded by a few chunks plus 16 bytes per record, 32 while sorted runs merge (a
sorted 64-bit hash of each id and its row, for the duplicate check; an equal hash is settled by
comparing the ids themselves, read back from disk, so a hash collision never reports a false
duplicate).

Order of errors, as in the old path, where reading finishes before tokenizing starts: a problem
found while reading (bad JSON, a duplicate id, ...) is raised where it is met; the first problem
found while tokenizing is held back until the whole corpus has been read, and raised then unless
a reading problem came first.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from grass_llm.data._corpus_tables import HashIndex, Tables
from grass_llm.data._corpus_worker import (
    ChunkResult,
    WorkerState,
    absolute_location,
    init_worker,
    pool_task,
    relative_location,
    tokenize_chunk,
)
from grass_llm.data.readers import CHUNK_BYTES, CHUNK_RECORDS, iter_chunks
from grass_llm.data.records import Reporter, duplicate_reason
from grass_llm.data.specials import Specials
from grass_llm.data.tokenize import duplicate_example_reason

SKIPPED_FILE = "skipped.jsonl"
_BUILD_FILES = ("build_record_ids.bin", "build_record_ids_offsets.i64", "build_record_locs.bin",
                "build_record_locs_offsets.i64", "build_skipped_read.jsonl",
                "build_skipped_tok.jsonl")


def build(folder: Path, data: Path, fmt: str, split: str | None, tokenizer, specials: Specials,
          *, max_length: int, overflow: str, on_error: str, num_proc: int, progress: bool,
          chunk_records: int = CHUNK_RECORDS, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Writes the tokenized corpus into ``folder`` (an empty directory).

    Args:
        num_proc: Worker processes (1: tokenize in this process).
        chunk_records, chunk_bytes: Records (bytes of lines) per chunk (see
            ``readers.iter_chunks``; tests make them small to get many chunks).

    Returns:
        ``{"n_examples", "n_tokens", "n_skipped", "fingerprint"}``.

    Raises:
        DataError: As ``read_records`` + ``tokenize_records`` would, for the same corpus.
    """
    prefix = str(data)
    tables = Tables(folder)
    seq = Sequencer(tables, on_error, overflow == "chunk", prefix)
    state = WorkerState(tokenizer, specials, max_length, overflow, prefix)
    bar = tqdm(desc="tokenizing the corpus", unit=" records", unit_scale=True,
               dynamic_ncols=True, disable=not progress)
    try:
        with (_Inline(state) if num_proc <= 1 else _Pool(num_proc, state)) as pool:
            window: deque = deque()
            for chunk in iter_chunks(data, fmt, split, max_records=chunk_records,
                                     max_bytes=chunk_bytes):
                window.append(chunk if chunk[0] == "raise" else pool.submit(chunk, not seq.failed))
                while len(window) > 2 * pool.workers:
                    _apply(seq, window.popleft(), bar)
            while window:
                _apply(seq, window.popleft(), bar)
        seq.finish()
    finally:
        tables.close()
        seq.close()
        bar.close()
    with open(folder / SKIPPED_FILE, "wb") as out:
        for name in ("build_skipped_read.jsonl", "build_skipped_tok.jsonl"):
            out.write((folder / name).read_bytes())
    for name in _BUILD_FILES:
        (folder / name).unlink()
    return {"n_examples": tables.ids.n, "n_tokens": tables.n_tokens,
            "n_skipped": seq.n_read_skipped + seq.n_tok_skipped,
            "fingerprint": tables.fingerprint.hexdigest()}


def _apply(seq: Sequencer, item, bar) -> None:
    if isinstance(item, tuple):  # a ("raise", None, error) chunk: an error met while reading
        raise item[2]
    try:
        result = item.result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "a tokenizing worker process died (killed for lack of memory? or a script that "
            "starts processes without `if __name__ == \"__main__\":`, which spawned workers "
            "need); pass num_proc=1 to tokenize in this process") from err
    seq.apply(result)
    bar.update(result.n_items)
    elapsed = bar.format_dict.get("elapsed") or 0.0
    if elapsed > 0:
        bar.set_postfix(tokens=f"{seq.t.n_tokens / 1e6:.1f}M",
                        tokens_per_s=f"{seq.t.n_tokens / elapsed / 1e6:.2f}M", refresh=False)


class _Inline:
    """Tokenizes in this process (a small corpus, or ``num_proc=1``)."""

    workers = 1

    def __init__(self, state: WorkerState):
        self.state = state

    def submit(self, chunk, tokenize: bool) -> Future:
        future: Future = Future()
        future.set_result(tokenize_chunk(self.state, chunk, tokenize))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Pool:
    """Worker processes, spawned (not forked: the caller may hold threads, CUDA, a process group)
    with the tokenizer pickled once each."""

    def __init__(self, n: int, state: WorkerState):
        self.workers = n
        self._ex = ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
            initargs=(state.tokenizer, state.specials, state.max_length, state.overflow,
                      state.prefix))

    def submit(self, chunk, tokenize: bool) -> Future:
        return self._ex.submit(pool_task, chunk, tokenize)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


class Sequencer:
    """Applies chunk results in file order: the duplicate checks, the ``on_error`` policy, the
    writes. See the module docstring for the order of errors.

    Args:
        tables: Where the examples go.
        on_error: ``"error"`` or ``"skip"``.
        chunked: Whether ``overflow == "chunk"`` (example ids may then differ from record ids).
        prefix: The corpus path, for locations.
    """

    def __init__(self, tables: Tables, on_error: str, chunked: bool, prefix: str):
        self.t, self.chunked, self.prefix = tables, chunked, prefix
        self.read = Reporter(on_error)  # its ``skipped`` is moved to a file after each chunk
        self.tok = Reporter(on_error)
        self.n_read_skipped = self.n_tok_skipped = 0
        self.records, self.examples = HashIndex(), HashIndex()
        self.deferred: BaseException | None = None
        self._read_file = open(tables.folder / "build_skipped_read.jsonl", "w")
        self._tok_file = open(tables.folder / "build_skipped_tok.jsonl", "w")

    @property
    def failed(self) -> bool:
        return self.deferred is not None

    def apply(self, r: ChunkResult) -> None:
        accepted = self._read_level(r)
        base = self.t.rec_ids.n
        self.t.rec_ids.append(r.rec_ids)
        self.t.rec_locs.append(r.rec_locs)
        rows = base + np.flatnonzero(accepted)
        self.records.add(r.rec_hash[accepted], rows)
        if not self.failed:
            self._tok_level(r, accepted)
        self.n_read_skipped += self._flush(self.read, self._read_file)
        self.n_tok_skipped += self._flush(self.tok, self._tok_file)

    def finish(self) -> None:
        """Raises the held-back tokenizing error, if any."""
        if self.deferred is not None:
            raise self.deferred

    def close(self) -> None:
        self._read_file.close()
        self._tok_file.close()

    def _flush(self, reporter: Reporter, f) -> int:
        n = len(reporter.skipped)
        for s in reporter.skipped:
            entry = asdict(s)
            entry["location"] = relative_location(s.location, self.prefix)
            f.write(json.dumps(entry, ensure_ascii=True) + "\n")
        reporter.skipped.clear()
        return n

    def _read_event(self, event) -> None:
        kind = event[0]
        if kind == "problem":
            self.read.problem(*event[1:])  # raises under on_error="error"
        elif kind == "note":
            self.read.skipped.append(event[1])
        else:
            assert kind == "raise", event
            raise event[1]

    def _read_level(self, r: ChunkResult) -> np.ndarray:
        """bool [J]: which candidate records are records (not a duplicate id)."""
        n = len(r.rec_ids)
        flagged = _flag(r.rec_hash, self.records)
        accepted = np.ones(n, bool)
        if not r.events and not flagged.size:
            return accepted
        pending: dict[int, list[tuple[str, str]]] = {}  # hash -> (id, location) in this chunk
        events = iter(r.events)
        event = next(events, None)
        for j in list(flagged) + [n]:
            while event is not None and event[0] <= j:
                self._read_event(event[1])
                event = next(events, None)
            if j == n:
                break
            rid, loc, h = r.rec_ids[j], r.rec_locs[j], int(r.rec_hash[j])
            first = self._first_record(h, rid, pending)
            if first is not None:
                self.read.problem(loc, duplicate_reason(rid, first), rid)
                accepted[j] = False
            else:
                pending.setdefault(h, []).append((rid, loc))
        return accepted

    def _first_record(self, h: int, rid: str, pending) -> str | None:
        """Location of the earlier record with id ``rid``, or None: the exact check behind an
        equal hash."""
        for row in self.records.rows(h):
            if self.t.rec_ids.get(row) == rid:
                return self.t.rec_locs.get(row)
        return next((loc for other, loc in pending.get(h, ()) if other == rid), None)

    def _tok_level(self, r: ChunkResult, accepted: np.ndarray) -> None:
        """Applies the tokenizing outcomes of the accepted records; writes the examples."""
        flagged = _flag(r.ex_hash, self.examples) if self.chunked else np.zeros(0, np.int64)
        if not r.tok_events and accepted.all() and not flagged.size:
            self._write(r, None)
            return
        starts = np.concatenate([[0], np.cumsum(r.rec_n_ex)])
        owner = np.repeat(np.arange(len(r.rec_ids)), r.rec_n_ex)
        todo = sorted({j for j, _, _ in r.tok_events} | set(np.flatnonzero(~accepted).tolist())
                      | set(owner[flagged].tolist()))
        events: dict[int, list] = {}
        for j, kind, payload in r.tok_events:
            events.setdefault(j, []).append((kind, payload))
        keep = np.ones(len(r.ex_ids), bool)
        pending: dict[int, list[tuple[str, str]]] = {}
        flagged_set = set(flagged.tolist())
        try:
            for j in todo:
                if not accepted[j]:
                    keep[starts[j]:starts[j + 1]] = False
                    continue
                rid, loc = r.rec_ids[j], r.rec_locs[j]
                for kind, payload in events.get(j, ()):
                    if kind == "invalid":
                        self.tok.problem(loc, payload, rid)
                    elif kind == "window":
                        self.tok.skipped.append(payload)
                    else:
                        raise payload
                for k in range(starts[j], starts[j + 1]):
                    if k in flagged_set and not self._new_example(r, k, loc, pending):
                        keep[k] = False
        except Exception as err:  # noqa: BLE001 - held back until reading is done
            self.deferred = err
            return
        self._write(r, keep)

    def _new_example(self, r: ChunkResult, k: int, loc: str, pending) -> bool:
        """Whether example k's id is new (else reports the duplicate)."""
        eid, h = r.ex_ids[k], int(r.ex_hash[k])
        first = next((absolute_location(self.t.locs.get(row), self.prefix)
                      for row in self.examples.rows(h) if self.t.ids.get(row) == eid), None)
        if first is None:
            first = next((f for other, f in pending.get(h, ()) if other == eid), None)
        if first is not None:
            self.tok.problem(loc, duplicate_example_reason(eid, first), eid)
            return False
        pending.setdefault(h, []).append((eid, loc))
        return True

    def _write(self, r: ChunkResult, keep: np.ndarray | None) -> None:
        base = self.t.ids.n
        self.t.add_examples(r, keep)
        if self.chunked:
            kept = r.ex_hash if keep is None else r.ex_hash[keep]
            self.examples.add(kept, base + np.arange(len(kept)))


def _flag(hashes: np.ndarray, index: HashIndex) -> np.ndarray:
    """Sorted positions (int64) whose hash is in ``index`` or occurs twice in ``hashes``: the
    only ones that can be duplicates."""
    if not len(hashes):
        return np.zeros(0, np.int64)
    hit = index.hits(hashes)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    hit |= counts[inverse] > 1
    return np.flatnonzero(hit)
