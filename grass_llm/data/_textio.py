"""Readers of the text-based corpus formats: JSON Lines, JSON, a text file, a text directory.

Files are read as bytes and decoded here (not by ``open(encoding=...)``) so that a non-UTF-8 byte
is reported with its line number and byte offset instead of a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from grass_llm.data.records import DataError, RecordCollector, Skipped

TEXTDIR_SUFFIXES = (".txt", ".md")

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yields ``(line number (1-based), byte offset of the line, line bytes)`` of a file.

    The line ending (``\\n`` or ``\\r\\n``) is removed; a UTF-8 byte-order mark is dropped.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            yield lineno, start, raw.rstrip(b"\n").rstrip(b"\r")


def _utf8_reason(err: UnicodeDecodeError, line_offset: int, decoded_from: int = 0) -> str:
    """Message for a decoding error.

    Args:
        err: The error; ``err.start`` indexes the bytes that were decoded.
        line_offset: Byte offset in the file of the line holding the bad byte.
        decoded_from: Byte offset in the file of the first decoded byte.
    """
    at = decoded_from + err.start
    return (f"invalid UTF-8 byte {err.object[err.start]:#04x} at byte offset {at} of the file "
            f"(byte {at - line_offset} of the line); re-encode the file as UTF-8")


def _text_lines(path: Path, collector: RecordCollector):
    """Yield ``(record index, location, decoded line)`` for each non-blank line; a line that is
    not UTF-8 is reported to the collector (and still takes its record index)."""
    index = 0
    for lineno, offset, raw in _lines(path):
        if not raw.strip():
            continue
        location = f"{path}:{lineno}"
        index += 1
        try:
            yield index - 1, location, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            collector.problem(location, _utf8_reason(err, offset, offset))


def read_jsonl(path: Path, collector: RecordCollector) -> None:
    """Reads one JSON object per line; blank lines are ignored (and take no record index)."""
    for index, location, text in _text_lines(path, collector):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            collector.problem(location, f"invalid JSON: {err.msg} (column {err.colno})")
            continue
        collector.add(index, value, location)


def read_text_lines(path: Path, collector: RecordCollector) -> None:
    """Reads one document per non-blank line as ``{"text": line}`` (line ending removed)."""
    for index, location, text in _text_lines(path, collector):
        collector.add(index, {"text": text}, location)


def _decode_file(path: Path, location: str) -> str:
    """Decodes a whole file as UTF-8; raises DataError naming the line and byte offset."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        start = skip + err.start
        line = data.count(b"\n", 0, start) + 1
        line_start = data.rfind(b"\n", 0, start) + 1
        raise DataError(f"{location}:{line}", _utf8_reason(err, line_start, skip)) from None


def read_text_dir(path: Path, collector: RecordCollector) -> None:
    """Reads every .txt/.md file under ``path`` (recursively) as one ``{"text": ...}`` document.

    The id is the path relative to ``path`` (with ``/``); files are read in sorted order. Other
    files are not documents: they are listed in ``collector.reporter.skipped`` under either policy
    (a README or licence next to the corpus is normal), so none vanishes unseen. Hidden files
    and directories (name starting with ".", e.g. ``.git``) are not looked at.
    """
    files = sorted(_visible_files(path))
    if not any(rel.endswith(TEXTDIR_SUFFIXES) for rel in files):
        raise DataError(str(path), f"no {'/'.join(TEXTDIR_SUFFIXES)} files in this directory",
                        "Point to a directory of text files, or pass format= explicitly")
    for index, rel in enumerate(files):
        location = os.path.join(str(path), rel)
        if not rel.endswith(TEXTDIR_SUFFIXES):
            collector.reporter.skipped.append(
                Skipped(rel, location, f"not a {'/'.join(TEXTDIR_SUFFIXES)} file"))
            continue
        try:
            text = _decode_file(path / rel, location)
        except DataError as err:
            collector.problem(err.location, err.reason, rel)
            continue
        collector.add(index, {"text": text}, location, record_id=rel)


def _visible_files(root: Path) -> Iterator[str]:
    """Relative paths (with ``/``) of the files under ``root``, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune: don't descend
        base = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith("."):
                yield (base / name).as_posix()


def read_json(path: Path, collector: RecordCollector) -> None:
    """Reads a top-level JSON array of objects, or an object holding that array under "data".

    Problems with the file as a whole (bad UTF-8, invalid JSON, wrong top-level shape) always
    raise: there is no record to skip. Each record's location names the line it starts on.
    """
    text = _decode_file(path, str(path))
    try:
        top = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}", f"invalid JSON: {err.msg} (column {err.colno})",
                        "Fix the file; a JSON file must parse as a whole") from None
    start = _WS.match(text, 0).end()
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        items, start = top["data"], _data_value_offset(text, start)
    elif isinstance(top, list):
        items = top
    else:
        found = "an object without a list under 'data'" if isinstance(top, dict) else type(
            top).__name__
        raise DataError(str(path), f"expected a top-level list of objects or an object with a "
                                   f"list under 'data', found {found}",
                        "Use .jsonl for one object per line")
    offsets = _list_item_offsets(text, start)
    line, previous = 1, 0
    for index, (value, offset) in enumerate(zip(items, offsets)):
        line += text.count("\n", previous, offset)  # incremental: linear in the file size
        previous = offset
        collector.add(index, value, f"{path}:{line} (record {index})")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _list_item_offsets(text: str, pos: int) -> list[int]:
    """Character offsets where the items of the JSON array at ``text[pos] == "["`` start.

    Only called on text that ``json.loads`` accepted, so the scan cannot meet a syntax error.
    """
    offsets = []
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "]":
        offsets.append(pos)
        _, end = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return offsets


def _data_value_offset(text: str, pos: int) -> int:
    """Offset of the value of the last "data" key (as ``json.loads`` keeps the last one) of the
    JSON object at ``text[pos] == "{"``."""
    found = -1
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "}":
        key, end = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, end) + 1)  # past the ':'
        if key == "data":
            found = pos
        _, end = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return found
