"""Read a training corpus into ``Record``s, whatever its format.

``read_records`` accepts JSON Lines, JSON, Parquet, a text file, a directory of text files, and
a Hugging Face dataset saved with ``save_to_disk``. Bad records raise a ``DataError`` naming the
file and line/row, or, with ``on_error="skip"``, are listed in ``ReadResult.skipped``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from grass_llm.data._textio import (
    TEXTDIR_SUFFIXES,
    json_values,
    line_blocks,
    parse_lines,
    parse_textdir,
    textdir_entries,
)
from grass_llm.data.records import (
    DataError,
    Record,
    RecordCollector,
    Skipped,
    check_on_error,
)

FORMATS = ("auto", "jsonl", "json", "parquet", "text", "textdir", "hf")

# File formats by extension (lower case). A single .md file is not mapped to "text": markdown
# paragraphs span lines, so one document per line would cut them apart.
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".pq": "parquet", ".txt": "text"}
# Files that ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top level.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_DIR_FORMATS = ("textdir", "hf")
_BATCH_ROWS = 1024  # rows converted to Python per Arrow batch: bounds memory on big tables
# A chunk (the unit handed to a tokenizing worker) holds about this many records (JSON values,
# files, table rows) or bytes of lines (JSON Lines, text).
CHUNK_RECORDS = 1024
CHUNK_BYTES = 256 << 10


@dataclass
class ReadResult:
    """What ``read_records`` read.

    Attributes:
        records: The records, in file order.
        skipped: What was left out, with reasons (bad records under ``on_error="skip"``; for
            ``textdir``, also files that are not .txt/.md under either policy).
    """

    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def read_records(path: str | os.PathLike, *, format: str = "auto", on_error: str = "error",
                 split: str | None = None) -> ReadResult:
    """Reads every record of a corpus.

    Args:
        path: A file (.jsonl/.ndjson, .json, .parquet/.pq, .txt) or a directory (of .txt/.md
            files, or a Hugging Face dataset saved with ``save_to_disk``).
        format: One of ``FORMATS``; ``"auto"`` picks by extension or directory contents.
        on_error: ``"error"`` raises ``DataError`` at the first bad record; ``"skip"`` leaves it
            out and lists it in ``ReadResult.skipped``. Problems with a file as a whole (missing,
            unreadable, invalid JSON document) always raise.
        split: For a saved ``DatasetDict``: which split to read (default ``"train"``).

    Returns:
        The records and the skipped entries.

    Raises:
        DataError: The path is missing or of an unknown format, or a record is bad (policy
            ``"error"``); the message names the file and line/row.
        ValueError: ``format`` or ``on_error`` is not a known value.
    """
    check_on_error(on_error)
    fmt = resolve_format(path, format, split)
    collector = RecordCollector(on_error)
    for chunk in iter_chunks(Path(path), fmt, split):
        for event in parse_chunk(chunk):
            collector.apply(event)
    return ReadResult(collector.records, collector.reporter.skipped)


def resolve_format(path: str | os.PathLike, format: str = "auto",
                   split: str | None = None) -> str:
    """The format of an existing corpus, after checking ``path``, ``format`` and ``split``.

    Raises:
        DataError: The path is missing, of an unknown format, or a file where a directory is
            needed (or the reverse).
        ValueError: ``format`` is unknown, or ``split`` is given for a format other than "hf".
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "no such file or directory",
                        "Check the path (relative paths are from the current directory)")
    fmt = detect_format(path) if format == "auto" else format
    if (fmt in _DIR_FORMATS) != path.is_dir():
        kind = "a directory" if fmt in _DIR_FORMATS else "a file"
        raise DataError(str(path), f"format {fmt!r} needs {kind}",
                        "Pass the matching path or format='auto'")
    if split is not None and fmt != "hf":
        raise ValueError(f"split={split!r} only applies to format 'hf', not {fmt!r} ({path})")
    return fmt


def iter_chunks(path: Path, fmt: str, split: str | None = None, *,
                max_records: int = CHUNK_RECORDS, max_bytes: int = CHUNK_BYTES):
    """The raw material of a corpus, in file order, in chunks that ``parse_chunk`` turns into
    events: what must run in order (reading the files; parsing a JSON file, which is one
    document) here, the rest (splitting and decoding lines, parsing JSON Lines, reading the
    files of a directory, converting table rows) in ``parse_chunk``, which may run in another
    process.

    A chunk is ``(kind, info, entries)``: about ``max_bytes`` of whole lines of a JSON Lines or
    text file, or up to ``max_records`` records of the other formats. An error met while
    reading (say an ``OSError`` mid-file) comes as a final chunk ``("raise", None, error)``
    after the records read before it, so whoever applies the chunks in order raises it where
    ``read_records`` would.

    Raises:
        DataError: Problems with the corpus as a whole, before the first chunk (see
            ``read_records``), or as its first chunk.
    """
    if fmt in ("jsonl", "text"):
        blocks = line_blocks(path, max_bytes)
        yield from _guarded(("lines", (str(path), fmt, start), block) for start, block in blocks)
        return
    if fmt in ("parquet", "hf"):
        label, batches = _arrow_source(path, fmt, split)
        yield from _guarded(_arrow_chunks(label, batches, max_records))
        return
    entries = json_values(path) if fmt == "json" else textdir_entries(path)
    kind, info = ("values", None) if fmt == "json" else ("files", str(path))
    yield from _guarded((kind, info, chunk) for chunk in _batched(entries, max_records))


def _batched(items, n: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _guarded(chunks):
    """``chunks``, then an error met while making them as a last chunk ``("raise", None,
    error)``."""
    try:
        yield from chunks
    except Exception as err:  # noqa: BLE001 - raised in order, after the records before it
        yield "raise", None, err


def _arrow_chunks(label: str, batches, max_records: int):
    """Chunks ``("arrow", (label, first row index), [record batches])`` of an Arrow source."""
    start = 0
    for chunk in _batched_rows(batches, max_records):
        yield "arrow", (label, start), chunk
        start += sum(batch.num_rows for batch in chunk)


def _batched_rows(batches, n: int):
    chunk, rows = [], 0
    for batch in batches:
        chunk.append(batch)
        rows += batch.num_rows
        if rows >= n:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk


def parse_chunk(chunk):
    """The events of one chunk of ``iter_chunks``, in order.

    Events are tuples: ``("add", index, value, location, record_id or None)`` (a parsed value
    to check and add as a record), ``("problem", location, reason, record_id or None)`` (a bad
    record: raised or skipped by policy) and ``("note", Skipped)`` (left out under either
    policy). See ``RecordCollector.apply``.

    Raises:
        Exception: The error of a ``"raise"`` chunk, or one met while reading (``OSError``).
    """
    kind, info, entries = chunk
    if kind == "lines":
        yield from parse_lines(*info, entries)
    elif kind == "values":
        for index, value, location in entries:
            yield "add", index, value, location, None
    elif kind == "files":
        yield from parse_textdir(info, entries)
    elif kind == "arrow":
        label, index = info
        for batch in entries:
            for row in batch.to_pylist():
                yield "add", index, row, f"{label}:row {index}", None
                index += 1
    else:
        assert kind == "raise", kind
        raise entries


def detect_format(path: Path) -> str:
    """The format ``read_records(format="auto")`` uses for an existing ``path``.

    Raises:
        DataError: The extension is unknown.
    """
    if path.is_dir():
        if any((path / name).is_file() for name in _HF_MARKERS):
            return "hf"
        return "textdir"
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise DataError(str(path), f"cannot tell the format from the extension "
                                   f"{path.suffix or '(none)'!r}; known extensions: {known}",
                        f"Rename the file or pass format= (one of {FORMATS[1:]})")
    return fmt


def _require(module: str, package: str, path: Path) -> ModuleType:
    """Imports an optional dependency, or raises a DataError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(str(path), f"reading this format needs the '{package}' package",
                        f"Install it: pip install {package}") from None


def _arrow_source(path: Path, fmt: str, split: str | None):
    """``(location label, iterable of Arrow record batches)`` of a Parquet file or a saved
    Hugging Face dataset."""
    if fmt == "parquet":
        pq = _require("pyarrow.parquet", "pyarrow", path)
        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DataError(str(path), f"not a readable Parquet file ({err})",
                            "Check that the file is complete and really Parquet") from err
        return str(path), parquet.iter_batches(batch_size=_BATCH_ROWS)
    datasets = _require("datasets", "datasets", path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... on bad dirs
        raise DataError(str(path), f"not a readable saved Hugging Face dataset ({err})",
                        "Save it with Dataset.save_to_disk") from err
    label = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in loaded:
            raise DataError(str(path), f"the saved DatasetDict has no split {name!r} (splits: "
                                       f"{sorted(loaded)})", "Pass split= one of those")
        loaded, label = loaded[name], f"{path}[{name}]"
    elif split is not None:
        raise DataError(str(path), f"split={split!r} given, but this is a single Dataset "
                                   "without splits", "Leave split unset")
    return label, loaded.with_format("arrow").iter(batch_size=_BATCH_ROWS)


__all__ = ["FORMATS", "TEXTDIR_SUFFIXES", "ReadResult", "detect_format", "iter_chunks",
           "parse_chunk", "read_records", "resolve_format"]
