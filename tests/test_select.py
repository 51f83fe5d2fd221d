"""``value --select``: the selected rows written back as a corpus (JSON Lines, Parquet, a saved
``datasets`` dataset), re-read equal to the corpus's own records; windows of a chunked document
map back to their record; a corpus that is gone or changed is refused, and nothing partial is
ever left behind."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.data import read_records
from grass_llm.data.subset import Selected, write_subset
from grass_llm.store import open_store
from tests.test_cache import CONFIG, CORPUS


def _cache(data, out, *extra):
    for cmd in (["cache", "--config", CONFIG, "--set", f"data={data}", "--set", f"out={out}",
                 *extra, "--quiet"], ["fisher", str(out)]):
        res = CliRunner().invoke(app, cmd, terminal_width=200)
        assert res.exit_code == 0, res.output


def _value(store, *extra):
    return CliRunner().invoke(app, ["value", str(store), "--target-store", str(store),
                                    "--device", "cpu", *extra], terminal_width=200)


def _selected_ids(values_file, n):
    """Record ids of the top-n rows of a values file (ranked, best first)."""
    lines = [json.loads(x) for x in open(values_file)]
    return [x["id"] for x in lines[:n]]


@pytest.fixture(scope="module")
def jsonl_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sel")
    data = folder / "corpus.jsonl"
    shutil.copy(CORPUS, data)
    _cache(data, folder / "s.zarr")
    return folder, data, folder / "s.zarr"


@pytest.mark.parametrize("fmt", ["auto", "hf"])
def test_selected_jsonl_records_round_trip(jsonl_store, tmp_path, fmt):
    folder, data, store = jsonl_store
    out = tmp_path / ("sel.jsonl" if fmt == "auto" else "sel_ds")
    res = _value(store, "--select", "0.4", "--select-out", str(out), "--select-format", fmt,
                 "--out", str(tmp_path / "v.jsonl"))
    assert res.exit_code == 0, res.output
    n = open_store(store).n_examples
    k = int(round(0.4 * n))
    chosen = set(_selected_ids(tmp_path / "v.jsonl", k))
    original = read_records(data).records
    want = [r for r in original if r.id in chosen]  # corpus order, original fields
    got = read_records(out).records
    assert len(want) == k and [r.id for r in got] == [r.id for r in want]
    if fmt == "auto":
        assert [r.fields for r in got] == [r.fields for r in want]
        # each line is the record's own object: the same keys in the same order
        assert [list(json.loads(x)) for x in out.read_text().splitlines()] == \
            [list(r.fields) for r in want]
    else:  # a datasets dataset: the columns of all records, missing ones null
        for g, w in zip(got, want):
            assert {key: v for key, v in g.fields.items() if v is not None} == w.fields
    assert f"({k} records) written" in " ".join(res.output.split())


def test_selected_parquet_rows_keep_the_schema_and_chunked_windows_map_to_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # one kind of record (a table with text and prompt rows would hold nulls, which the
    # tokenizer refuses)
    records = [r for r in map(json.loads, open(CORPUS)) if "text" in r]
    records[0]["text"] = " ".join([records[0]["text"]] * 6)  # longer than max_length: windows
    for i, r in enumerate(records):
        r["weight"] = np.float32(i / 7).item()
    table = pa.Table.from_pylist(records).replace_schema_metadata({"origin": "test"})
    table = table.cast(table.schema.set(table.schema.get_field_index("weight"),
                                        pa.field("weight", pa.float32())))
    data = tmp_path / "corpus.parquet"
    pq.write_table(table, data)
    store = tmp_path / "s.zarr"
    _cache(data, store, "--set", "overflow=chunk", "--set", "max_length=40")
    ids = [str(i) for i in open_store(store).example_ids()]
    windows = [i for i in ids if i.startswith(f"{records[0]['id']}#")]
    assert len(windows) > 1  # the long document was cut
    out = tmp_path / "sel.parquet"
    res = _value(store, "--select", "1", "--select-out", str(out), "--out",
                 str(tmp_path / "v.jsonl"))
    assert res.exit_code == 0, res.output
    got = pq.read_table(out)
    assert got.schema == table.schema and got.schema.metadata == table.schema.metadata
    # every record once (its windows were all selected), in corpus order, rows as they were
    assert got.to_pylist() == table.to_pylist()
    assert [r.fields for r in read_records(out).records] == table.to_pylist()


def test_a_changed_or_missing_corpus_is_refused_and_nothing_is_written(tmp_path):
    data = tmp_path / "corpus.jsonl"
    shutil.copy(CORPUS, data)
    store = tmp_path / "s.zarr"
    _cache(data, store)
    out = tmp_path / "sel.jsonl"
    args = ("--select", "0.5", "--select-out", str(out), "--out", str(tmp_path / "v.jsonl"))
    data.write_text(data.read_text().replace("Paris", "Lyon"))  # the corpus changed
    res = _value(store, *args)
    assert res.exit_code == 2 and "changed since" in res.output and not out.exists()
    data.unlink()
    res = _value(store, *args)
    assert res.exit_code == 2 and "is gone" in res.output and not out.exists()
    shutil.copy(CORPUS, data)
    cache = open_store(store).meta["dataset"]["corpus_path"]
    moved = tmp_path / "moved-cache"
    shutil.move(cache, moved)
    try:
        res = _value(store, *args)
        assert res.exit_code == 2 and "tokenized corpus cache" in res.output
    finally:
        shutil.move(moved, cache)  # the cache is shared (content-keyed): put it back
    res = _value(store, *args)
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".sel.jsonl.tmp-*"))


def test_a_failed_write_leaves_no_file(tmp_path):
    data = tmp_path / "corpus.jsonl"
    shutil.copy(CORPUS, data)
    out = tmp_path / "sel.jsonl"
    bad = [Selected(0, "x", {"t": b"bytes"})]  # JSON cannot hold bytes
    with pytest.raises(ValueError, match="JSON cannot hold"):
        write_subset(data, bad, out)
    assert list(tmp_path.iterdir()) == [data]
    with pytest.raises(ValueError, match="can be written as jsonl or as one of"):
        write_subset(data, [], tmp_path / "x.txt", out_format="text")
