"""The worker side of building a tokenized corpus (``grass_llm.data.corpus``): one chunk of the
corpus parsed and tokenized (``tokenize_chunk``) into flat arrays, with every problem kept as an
event at its position, for the main process (``_corpus_build.Sequencer``) to apply in order.

Workers are spawned processes; this module imports no torch (a worker is ~100 MB, not ~350).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field

import numpy as np

from grass_llm.data.readers import parse_chunk
from grass_llm.data.records import (
    IGNORE_INDEX,
    Invalid,
    Record,
    RecordProblem,
    Skipped,
    record_id_of,
)
from grass_llm.data.specials import Specials
from grass_llm.data.tokenize import encode_texts, tokenize_record

_INT32_MAX = np.iinfo(np.int32).max


def utf8(s: str) -> bytes:
    # surrogatepass: ids from JSON may hold lone surrogates ("\ud800"), paths undecodable bytes
    return s.encode("utf-8", "surrogatepass")


def from_utf8(b: bytes) -> str:
    return b.decode("utf-8", "surrogatepass")


def id_hashes(encoded: list[bytes]) -> np.ndarray:
    """64-bit hashes (uint64 [n]) of UTF-8 ids: the duplicate check's first filter."""
    return np.frombuffer(b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in encoded),
                         dtype="<u8").copy()


def relative_location(location: str, prefix: str) -> str:
    """``location`` without the corpus path it starts with, so the cache names the file where it
    is now when the corpus moves (the rare location that does not start with it is kept whole,
    marked by a leading NUL)."""
    return location[len(prefix):] if location.startswith(prefix) else "\0" + location


def absolute_location(stored: str, prefix: str) -> str:
    return stored[1:] if stored.startswith("\0") else prefix + stored


class Strings:
    """Strings as one UTF-8 blob plus their byte lengths (int64 [n]): how a chunk's ids and
    locations travel from a worker and are written, with no Python object per string on the
    main side (a string is decoded only when looked at, for a problem)."""

    def __init__(self, blob: bytes = b"", lengths: np.ndarray | None = None):
        self.blob = blob
        self.lengths = np.zeros(0, np.int64) if lengths is None else lengths
        self._ends: np.ndarray | None = None

    @classmethod
    def of(cls, encoded: list[bytes]) -> Strings:
        """From UTF-8 strings (``utf8``)."""
        return cls(b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> str:
        ends = self._offsets()
        return from_utf8(self.blob[ends[i]:ends[i + 1]])

    def _offsets(self) -> np.ndarray:
        if self._ends is None:
            self._ends = np.concatenate([[0], np.cumsum(self.lengths)])
        return self._ends

    def select(self, keep: np.ndarray) -> Strings:
        """The strings where ``keep`` (bool [n])."""
        ends = self._offsets()
        return Strings(b"".join(self.blob[ends[i]:ends[i + 1]] for i in np.flatnonzero(keep)),
                       self.lengths[keep])


@dataclass
class WorkerState:
    """What a worker needs: the tokenizer and the tokenize settings."""

    tokenizer: object
    specials: Specials
    max_length: int
    overflow: str
    prefix: str


_WORKER: WorkerState | None = None


def init_worker(tokenizer, specials: Specials, max_length: int, overflow: str,
                prefix: str) -> None:
    """Pool initializer. One worker per core already: the tokenizer's own threads would only
    compete with the other workers."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = WorkerState(tokenizer, specials, max_length, overflow, prefix)


def pool_task(chunk, tokenize: bool) -> ChunkResult:
    return tokenize_chunk(_WORKER, chunk, tokenize)


@dataclass
class ChunkResult:
    """One chunk, parsed and tokenized; ``j`` numbers its candidate records (values that are
    valid records, before the duplicate check), ``k`` its examples.

    Attributes:
        events: ``(j, event)``: a reading event (``("problem", location, reason, id)``,
            ``("note", Skipped)`` or ``("raise", error)``) met before candidate record j.
        rec_ids, rec_locs: Id and location of each candidate record (``Strings``).
        rec_hash: uint64 [J], ``id_hashes`` of the ids.
        tok_events: ``(j, kind, payload)`` in order: ``("invalid", reason)``, ``("raise",
            error)`` or ``("window", Skipped)`` (a target-less window of a chunked record).
        rec_n_ex: int64 [J], examples of each record (0 when it failed).
        ex_ids, ex_locs: Id and stored location (``relative_location``) of each example
            (``Strings``).
        ex_hash: uint64 [K], hashes of the example ids (only with ``overflow="chunk"``, where
            they can differ from the record ids).
        tokens: int32 [N], the examples' token ids concatenated; mask: uint8 [N], 1 where the
            label is the token (a target), 0 where it is -100.
        lengths: int32 [K]; n_targets: int32 [K], targets among positions 1.. (the first
            token has no prediction).
    """

    events: list = field(default_factory=list)
    rec_ids: Strings = field(default_factory=Strings)
    rec_locs: Strings = field(default_factory=Strings)
    rec_hash: np.ndarray | None = None
    tok_events: list = field(default_factory=list)
    rec_n_ex: np.ndarray | None = None
    ex_ids: Strings = field(default_factory=Strings)
    ex_locs: Strings = field(default_factory=Strings)
    ex_hash: np.ndarray | None = None
    tokens: np.ndarray | None = None
    mask: np.ndarray | None = None
    lengths: np.ndarray | None = None
    n_targets: np.ndarray | None = None
    n_items: int = 0


def portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to come back from a worker), else a RuntimeError with
    its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception type may fail to pickle
        return RuntimeError(f"{type(err).__name__}: {err}")


def tokenize_chunk(state: WorkerState, chunk, tokenize: bool = True) -> ChunkResult:
    """Parses one chunk of ``readers.iter_chunks`` and tokenizes its records (not when
    ``tokenize`` is false: after an error only reading problems still matter)."""
    out = ChunkResult()
    records: list[Record] = []
    try:
        for event in parse_chunk(chunk):
            out.n_items += 1
            if event[0] != "add":
                out.events.append((len(records), event))
                continue
            _, index, value, location, given = event
            try:
                rid = record_id_of(index, value, location, given)
            except RecordProblem as p:
                out.events.append((len(records), ("problem", p.location, p.reason, p.record_id)))
                continue
            records.append(Record(rid, value, location))
    except Exception as err:  # noqa: BLE001 - raised in order by the main process
        out.events.append((len(records), ("raise", portable(err))))
    encoded = [utf8(r.id) for r in records]
    out.rec_ids, out.rec_hash = Strings.of(encoded), id_hashes(encoded)
    out.rec_locs = Strings.of([utf8(r.location) for r in records])
    _tokenize(state, records if tokenize else [], out)
    return out


def _tokenize(state: WorkerState, records: list[Record], out: ChunkResult) -> None:
    encoded = encode_texts(records, state.tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    ex_ids: list[bytes] = []
    ex_locs: list[bytes] = []
    n_ex = np.zeros(len(out.rec_ids), np.int64)
    for j, record in enumerate(records):
        skipped: list[Skipped] = []
        try:
            windows = tokenize_record(record, state.tokenizer, state.specials, state.max_length,
                                      state.overflow, skipped, encoded)
        except Invalid as problem:
            out.tok_events.append((j, "invalid", str(problem)))
            continue
        except Exception as err:  # noqa: BLE001 - raised in order by the main process
            out.tok_events.append((j, "raise", portable(err)))
            continue
        out.tok_events.extend((j, "window", s) for s in skipped)
        n_ex[j] = len(windows)
        location = utf8(relative_location(record.location, state.prefix))
        for ex in windows:
            ex_ids.append(utf8(ex.id))
            ex_locs.append(location)
            ids.extend(ex.input_ids)
            labels.extend(ex.labels)
            lengths.append(len(ex.input_ids))
    out.rec_n_ex = n_ex
    out.ex_ids, out.ex_locs = Strings.of(ex_ids), Strings.of(ex_locs)
    if state.overflow == "chunk":
        out.ex_hash = id_hashes(ex_ids)
    tokens = np.array(ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > _INT32_MAX):
        raise ValueError(f"token ids must be in 0..{_INT32_MAX}, found {tokens.min()}.."
                         f"{tokens.max()}")
    label_arr = np.array(labels, dtype=np.int64)
    mask = label_arr != IGNORE_INDEX
    # The files keep tokens and a target mask; that is the labels only if every target label is
    # its token, which is how labels are made (see grass_llm.data.tokenize).
    assert np.array_equal(label_arr[mask], tokens[mask]), "a target label differs from its token"
    out.tokens, out.mask = tokens.astype("<i4"), mask.astype(np.uint8)
    out.lengths = np.array(lengths, dtype="<i4")
    out.n_targets = _targets_after_first(out.mask, out.lengths)


def _targets_after_first(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Targets of each example among its positions 1.. (int32 [K]); every example has >= 1
    token."""
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    ends = np.cumsum(lengths, dtype=np.int64)
    return (csum[ends] - csum[ends - lengths + 1]).astype("<i4")
