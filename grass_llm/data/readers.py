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
    read_json,
    read_jsonl,
    read_text_dir,
    read_text_lines,
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
    collector = RecordCollector(on_error)
    if fmt == "parquet":
        _read_parquet(path, collector)
    elif fmt == "hf":
        _read_hf(path, split, collector)
    else:
        reader = {"jsonl": read_jsonl, "json": read_json, "text": read_text_lines,
                  "textdir": read_text_dir}[fmt]
        reader(path, collector)
    return ReadResult(collector.records, collector.reporter.skipped)


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


def _add_rows(batches, label: str, collector: RecordCollector) -> None:
    """Adds every row of an iterable of Arrow record batches or tables, as ``label:row <i>``."""
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            collector.add(index, row, f"{label}:row {index}")
            index += 1


def _read_parquet(path: Path, collector: RecordCollector) -> None:
    pq = _require("pyarrow.parquet", "pyarrow", path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(str(path), f"not a readable Parquet file ({err})",
                        "Check that the file is complete and really Parquet") from err
    _add_rows(parquet.iter_batches(batch_size=_BATCH_ROWS), str(path), collector)


def _read_hf(path: Path, split: str | None, collector: RecordCollector) -> None:
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
    _add_rows(loaded.with_format("arrow").iter(batch_size=_BATCH_ROWS), label, collector)


__all__ = ["FORMATS", "TEXTDIR_SUFFIXES", "ReadResult", "detect_format", "read_records"]
