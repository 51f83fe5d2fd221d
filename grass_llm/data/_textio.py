"""Readers of the text-based corpus formats: JSON Lines, JSON, a text file, a text directory.

Files are read as bytes and decoded here (not by ``open(encoding=...)``) so that a non-UTF-8 byte
is reported with its line number and byte offset instead of a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grass_llm.data.records import DataError, Skipped

TEXTDIR_SUFFIXES = (".txt", ".md")

_WS = re.compile(r"[ \t\n\r]*")
# A blank line: nothing but the ASCII whitespace ``bytes.strip`` removes, then its line end.
_BLANK_LINE = re.compile(rb"^[ \t\r\x0b\x0c]*\n", re.M)
_DECODER = json.JSONDecoder()


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


def line_blocks(path: Path, max_bytes: int) -> Iterator[tuple[tuple[int, int, int], bytes]]:
    """Consecutive whole lines of a file in blocks of about ``max_bytes``: ``((record index,
    line number, byte offset) of the block's first line, block)``, the raw material of the
    one-record-per-line formats, split and decoded by ``parse_lines`` (possibly in another
    process: the part that runs here is C-speed reading and counting). A UTF-8 byte-order mark
    at the start is dropped. Record indices count the non-blank lines.
    """
    index, lineno, offset = 0, 1, 0
    buf = bytearray()
    with open(path, "rb", buffering=0) as f:
        first = f.read(max(max_bytes, len(codecs.BOM_UTF8)))
        if first.startswith(codecs.BOM_UTF8):
            first, offset = first[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        for data in itertools.chain([first], iter(lambda: f.read(max_bytes), b"")):
            end = data.rfind(b"\n")
            if end < 0:  # no line ends here: a long line, keep reading
                buf += data
                continue
            cut = len(buf) + end + 1
            buf += data
            block, buf = bytes(buf[:cut]), buf[cut:]
            yield (index, lineno, offset), block
            n = block.count(b"\n")
            index += n - len(_BLANK_LINE.findall(block))
            lineno, offset = lineno + n, offset + len(block)
    if buf:  # the last line, without a line ending
        yield (index, lineno, offset), bytes(buf)


def parse_lines(path: str, fmt: str, start: tuple[int, int, int], block: bytes
                ) -> Iterator[tuple]:
    """Events (see ``readers.parse_chunk``) of a ``line_blocks`` block of a ``"jsonl"`` file
    (one JSON object per line) or a ``"text"`` file (one ``{"text": line}`` document per line).
    Blank lines are ignored (and take no record index); the line ending (``\n`` or ``\r\n``)
    is removed."""
    index, lineno, offset = start
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()  # the empty piece after the last line ending
    for line in lines:
        raw = line.rstrip(b"\r")
        if raw.strip():
            yield _parse_line(fmt, index, f"{path}:{lineno}", offset, raw)
            index += 1
        lineno, offset = lineno + 1, offset + len(line) + 1


def _parse_line(fmt: str, index: int, location: str, offset: int, raw: bytes) -> tuple:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "problem", location, _utf8_reason(err, offset, offset), None
    if fmt == "text":
        return "add", index, {"text": text}, location, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return "problem", location, f"invalid JSON: {err.msg} (column {err.colno})", None
    return "add", index, value, location, None


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


def textdir_entries(path: Path) -> list[tuple[int, str]]:
    """``(index, relative path)`` of every visible file under ``path``, sorted (read by
    ``parse_textdir``).

    Raises:
        DataError: No .txt/.md file is there.
    """
    files = sorted(visible_files(path))
    if not any(rel.endswith(TEXTDIR_SUFFIXES) for rel in files):
        raise DataError(str(path), f"no {'/'.join(TEXTDIR_SUFFIXES)} files in this directory",
                        "Point to a directory of text files, or pass format= explicitly")
    return list(enumerate(files))


def parse_textdir(root: str, entries) -> Iterator[tuple]:
    """Events of ``textdir_entries``: every .txt/.md file is one ``{"text": ...}`` document.

    The id is the path relative to the directory (with ``/``). Other files are not documents:
    they are listed as skipped under either policy (a README or licence next to the corpus is
    normal), so none vanishes unseen. Hidden files and directories (name starting with ".",
    e.g. ``.git``) are not looked at.
    """
    for index, rel in entries:
        location = os.path.join(root, rel)
        if not rel.endswith(TEXTDIR_SUFFIXES):
            yield "note", Skipped(rel, location, f"not a {'/'.join(TEXTDIR_SUFFIXES)} file")
            continue
        try:
            text = _decode_file(Path(root) / rel, location)
        except DataError as err:
            yield "problem", err.location, err.reason, rel
            continue
        yield "add", index, {"text": text}, location, rel


def visible_files(root: Path) -> Iterator[str]:
    """Relative paths (with ``/``) of the files under ``root``, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune: don't descend
        base = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith("."):
                yield (base / name).as_posix()


class _Irregular(Exception):
    """The streaming scan of a JSON document met something it does not follow (usually a
    syntax error); ``json.loads`` then decides what the document is."""


def json_values(path: Path) -> Iterator[tuple[int, Any, str]]:
    """``(index, value, location)`` of each record of a JSON file: a top-level array of objects,
    or an object holding that array under "data" (its last "data" key, as ``json.loads``
    keeps).

    The file is held as text (one copy) and validated as a whole before the first record, but
    records are parsed one at a time, so the parsed corpus is never in memory. Problems with the
    file as a whole (bad UTF-8, invalid JSON, wrong top-level shape) always raise: there is no
    record to skip. Each record's location names the line it starts on.

    Raises:
        DataError: The file is not UTF-8, not JSON, or not of either shape.
    """
    text = _decode_file(path, str(path))
    start = _skip_ws(text, 0)
    try:
        list_at = _validate(text, start)
    except _Irregular:
        yield from _whole_document_values(path, text, start)
        return
    if list_at is None:
        raise _shape_error(path, "an object without a list under 'data'")
    line, previous = 1, 0
    for index, (offset, value) in enumerate(_list_items(text, list_at)):
        line += text.count("\n", previous, offset)  # incremental: linear in the file size
        previous = offset
        yield index, value, f"{path}:{line} (record {index})"


def _shape_error(path: Path, found: str) -> DataError:
    return DataError(str(path), f"expected a top-level list of objects or an object with a "
                                f"list under 'data', found {found}",
                     "Use .jsonl for one object per line")


def _whole_document_values(path: Path, text: str, start: int) -> Iterator[tuple[int, Any, str]]:
    """``json_values`` by ``json.loads`` of the whole document: where the streaming scan gave
    up, so that a broken document gets ``json.loads``'s own error message."""
    try:
        top = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}", f"invalid JSON: {err.msg} (column {err.colno})",
                        "Fix the file; a JSON file must parse as a whole") from None
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        items, start = top["data"], _data_value_offset(text, start)
    elif isinstance(top, list):
        items = top
    else:
        raise _shape_error(path, "an object without a list under 'data'"
                           if isinstance(top, dict) else type(top).__name__)
    line, previous = 1, 0
    for index, (value, (offset, _)) in enumerate(zip(items, _list_items(text, start))):
        line += text.count("\n", previous, offset)
        previous = offset
        yield index, value, f"{path}:{line} (record {index})"


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _decode_at(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except ValueError:
        raise _Irregular from None


def _list_items(text: str, pos: int):
    """Yields ``(offset, value)`` of each item of the JSON array at ``text[pos] == "["``;
    returns the offset just past it. Raises ``_Irregular`` where the array is not valid JSON."""
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    while True:
        value, end = _decode_at(text, pos)
        yield pos, value
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return pos + 1
        else:
            raise _Irregular


def _skip_list(text: str, pos: int) -> int:
    """Validates the JSON array at ``text[pos]`` item by item (so a big one is never held
    parsed); returns the offset past it."""
    items = _list_items(text, pos)
    while True:
        try:
            next(items)
        except StopIteration as stop:
            return stop.value


def _validate(text: str, pos: int) -> int | None:
    """Checks that ``text`` is one JSON array or object (from ``pos``) and nothing more.

    Returns:
        The offset of the record list: the array itself, or the last "data" value of the
        object when that is an array (None when it is not).

    Raises:
        _Irregular: Anything else (a syntax error, a top-level scalar).
    """
    if text.startswith("[", pos):
        list_at, end = pos, _skip_list(text, pos)
    elif text.startswith("{", pos):
        list_at, end = _scan_object(text, pos)
    else:
        raise _Irregular
    if _skip_ws(text, end) != len(text):
        raise _Irregular
    return list_at


def _scan_object(text: str, pos: int) -> tuple[int | None, int]:
    """Validates the JSON object at ``text[pos] == "{"``; returns (offset of its last "data"
    value if that is an array else None, offset past the object)."""
    found = None
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        return None, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise _Irregular
        key, end = _decode_at(text, pos)
        pos = _skip_ws(text, end)
        if not text.startswith(":", pos):
            raise _Irregular
        pos = _skip_ws(text, pos + 1)
        is_list = text.startswith("[", pos)
        end = _skip_list(text, pos) if is_list else _decode_at(text, pos)[1]
        if key == "data":
            found = pos if is_list else None
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("}", pos):
            return found, pos + 1
        else:
            raise _Irregular


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
