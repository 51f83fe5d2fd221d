"""Records of a corpus by id, and a subset of them written as a corpus one can train on.

``read_selected`` streams a corpus (the readers' own chunks and parsing, so ids are derived
exactly as ``read_records`` derives them: the ``id`` field, else the record's index; the first
record of a duplicated id) and keeps only the wanted records' raw values. ``write_subset``
writes such records in the corpus's own format, or as JSON Lines, Parquet or a saved Hugging
Face ``datasets`` dataset, to a temporary path renamed into place when complete: a reader
never sees a partial file, and a failed write leaves no file.

Same-format output keeps what the format allows: JSON Lines and JSON get each record's
original object (fields and their order), Parquet the input's schema (types, metadata), a saved
dataset its features (``Dataset.select`` of the rows), a text file its lines, a directory of
text files a copy of each selected file. Records keep the corpus's order.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from grass_llm.data.readers import iter_chunks, parse_chunk, resolve_format
from grass_llm.data.records import RecordProblem, record_id_of

SUBSET_FORMATS = ("jsonl", "json", "parquet", "text", "textdir", "hf")
# formats any corpus can be written as (the others only as the corpus's own format)
CONVERTIBLE = ("jsonl", "parquet", "hf")
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "text": ".txt",
          "textdir": "", "hf": ""}


@dataclass
class Selected:
    """One wanted record: its position in the corpus (line record, list item, table row or
    file index, as the readers count), id and raw value."""

    index: int
    id: str
    value: dict


def read_selected(path: str | os.PathLike, ids: Iterable[str], *, format: str = "auto",
                  split: str | None = None) -> list[Selected]:
    """The records of ``path`` whose id is in ``ids``, in corpus order (bad records, which
    ``read_records`` would raise or skip, are passed over)."""
    fmt = resolve_format(path, format, split)
    wanted, found = set(ids), {}
    for chunk in iter_chunks(Path(path), fmt, split):
        for event in parse_chunk(chunk):
            if event[0] != "add":
                continue
            _, index, value, location, given = event
            try:
                rid = record_id_of(index, value, location, given)
            except RecordProblem:
                continue
            if rid in wanted and rid not in found:  # a later duplicate is not the record
                found[rid] = Selected(index, rid, value)
    return list(found.values())


def write_subset(path: str | os.PathLike, records: list[Selected], out: str | os.PathLike, *,
                 format: str = "auto", out_format: str | None = None,
                 split: str | None = None) -> Path:
    """Write ``records`` (from ``read_selected`` of ``path``) as a corpus at ``out``.

    Args:
        path, format, split: the corpus the records come from.
        out: a file, or a directory for ``hf`` and ``textdir``; replaced if it exists.
        out_format: one of ``SUBSET_FORMATS`` (default: the corpus's own); a format other
            than the corpus's must be one of ``CONVERTIBLE``.

    Raises:
        ValueError: an unknown or impossible format, or a record JSON cannot hold.
    """
    fmt = resolve_format(path, format, split)
    out_format = out_format or fmt
    if out_format not in SUBSET_FORMATS:
        raise ValueError(f"subset format must be one of {list(SUBSET_FORMATS)}, got "
                         f"{out_format!r}")
    if out_format != fmt and out_format not in CONVERTIBLE:
        raise ValueError(f"a {fmt} corpus can be written as {fmt} or as one of "
                         f"{list(CONVERTIBLE)}, not as {out_format}")
    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise ValueError(f"{out} is the corpus itself; write the subset elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _WRITERS[out_format](Path(path), fmt, split, records, tmp)
        _replace(tmp, out)
    finally:
        _remove(tmp)
    return out


def _jsonl(path, fmt, split, records, tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(_json(r) + "\n")


def _json(record: Selected) -> str:
    try:
        return json.dumps(record.value, ensure_ascii=False)
    except TypeError as err:  # e.g. a Parquet timestamp or binary column
        raise ValueError(f"record {record.id!r} has a value JSON cannot hold ({err}); write "
                         "the subset as parquet or hf instead") from None


def _json_array(path, fmt, split, records, tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(_json(r) for r in records) + "\n]\n")


def _text(path, fmt, split, records, tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(r.value["text"] + "\n" for r in records)


def _textdir(path, fmt, split, records, tmp):
    for r in records:  # the id of a file of a text directory is its relative path
        dest = tmp / r.id
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path / r.id, dest)
    tmp.mkdir(exist_ok=True)  # an empty selection is an empty directory


def _parquet(path, fmt, split, records, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt != "parquet":
        pq.write_table(pa.Table.from_pylist([r.value for r in records]), tmp)
        return
    source = pq.ParquetFile(path)
    rows = [r.index for r in records]  # increasing: records are in corpus order
    with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
        start, k = 0, 0
        for batch in source.iter_batches(batch_size=4096):
            stop, take = start + batch.num_rows, []
            while k < len(rows) and rows[k] < stop:
                take.append(rows[k] - start)
                k += 1
            if take:
                writer.write_batch(batch.take(pa.array(take)))
            start = stop


def _hf(path, fmt, split, records, tmp):
    import datasets

    if fmt != "hf":
        datasets.Dataset.from_list([r.value for r in records]).save_to_disk(str(tmp))
        return
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train" if split is None else split]
    loaded.select([r.index for r in records]).save_to_disk(str(tmp))


_WRITERS = {"jsonl": _jsonl, "json": _json_array, "text": _text, "textdir": _textdir,
            "parquet": _parquet, "hf": _hf}


def _replace(tmp: Path, out: Path) -> None:
    """Put the complete ``tmp`` at ``out``: one rename for a file; a directory that exists is
    moved aside first and removed after (a reader sees the old or the new one)."""
    if tmp.is_dir() and out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
        tmp.rename(out)
        _remove(old)
        return
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give a file path for this format")
    os.replace(tmp, out)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


__all__ = ["CONVERTIBLE", "SUBSET_FORMATS", "SUFFIX", "Selected", "read_selected",
           "write_subset"]
