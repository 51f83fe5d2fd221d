"""grass_llm.data.corpus: the tokenized corpus cache against the old path (``read_records`` +
``tokenize_records``, whose behaviour test_data.py pins down by hand), its cache key, atomic
builds, the fingerprint, two ranks, and host memory against corpus size.

The tokenizer is test_data's word-level one (built in code: BOS from its post-processor, a chat
template), except where the byte-level ``byte_tokenizer`` reads real text.
"""

import dataclasses
import functools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grass_llm.data import DataError, read_records, tokenize_records
from grass_llm.data import _corpus_build, _corpus_tables, _corpus_worker
from grass_llm.data import corpus as corpus_mod
from grass_llm.data.corpus import CorpusCacheError, TokenizedCorpus
from grass_llm.models import byte_tokenizer
from tests.test_data import CONVERSATION, make_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tiny_corpus.jsonl"
WORDS = ["hello", "world", "what", "is", "it"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def old_path(path, tok, *, format="auto", split=None, **kw):
    """``("ok", examples, skipped)`` or ``("error", message)`` of the old path."""
    try:
        read = read_records(path, format=format, split=split,
                            on_error=kw.get("on_error", "error"))
        out = tokenize_records(read.records, tok, **kw)
    except DataError as err:
        return "error", str(err)
    return ("ok", [dataclasses.astuple(e) for e in out.examples],
            [dataclasses.astuple(s) for s in read.skipped + out.skipped])


def new_path(path, tok, cache, *, num_proc=1, **kw):
    """The same of ``open_or_build``, after checking the per-example arrays against the
    examples."""
    try:
        c = TokenizedCorpus.open_or_build(path, tok, cache_dir=cache, num_proc=num_proc,
                                          progress=False, **kw)
    except DataError as err:
        return "error", str(err)
    examples = c.examples(range(len(c)))
    assert c.lengths.tolist() == [len(e.input_ids) for e in examples]
    # The runner's count for token_mode="loss": targets after position 0.
    assert c.n_targets.tolist() == [sum(lab != -100 for lab in e.labels[1:]) for e in examples]
    assert c.ids() == [e.id for e in examples] and c.n_tokens == int(c.lengths.sum())
    return ("ok", [dataclasses.astuple(e) for e in examples],
            [dataclasses.astuple(s) for s in c.skipped])


def assert_same(path, tok, cache, **kw):
    new = new_path(path, tok, cache, **kw)
    kw.pop("num_proc", None)
    old = old_path(path, tok, **kw)
    assert new == old
    return new


@pytest.fixture
def chunks(monkeypatch):
    """``chunks(k)``: build with k records per chunk (many chunks from a small corpus)."""
    def set_chunk(k):
        monkeypatch.setattr(corpus_mod, "build",
                            functools.partial(_corpus_build.build, chunk_records=k,
                                              chunk_bytes=40 * k))  # ~k lines
    return set_chunk


# ----------------------------------------------------------------------------- same as before


MIXED = [{"id": "t1", "text": "hello world"},
         {"id": "pc", "prompt": "what is it", "completion": "w1 w2"},
         {"id": "chat", "messages": CONVERSATION},
         {"id": "t1", "text": "a duplicate id"},
         {"id": "empty", "text": " "},
         {"id": [1], "text": "a bad id"},
         {"id": "long", "text": " ".join(WORDS[:12])},
         {"text": "no id"}]
TABLE = [{"id": "p0", "prompt": "what", "completion": "hello"},
         {"id": "p1", "prompt": "", "completion": "w1 w2 w3 w4 w5 w6 w7"},
         {"id": "p0", "prompt": "dup", "completion": "w3"},
         {"id": "p3", "prompt": "what is it", "completion": " "}]


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-data", "parquet", "hf"])
def test_each_record_format_and_kind_matches_the_old_path(tmp_path, tok, fmt):
    rows = TABLE if fmt in ("parquet", "hf") else MIXED
    path, _ = write_corpus(tmp_path, fmt, rows)
    for on_error in ("error", "skip"):
        for overflow in ("truncate", "chunk"):
            got = assert_same(path, tok, tmp_path / "cache", max_length=6, overflow=overflow,
                              on_error=on_error)
            assert got[0] == ("error" if on_error == "error" else "ok")
    assert len(got[1]) >= 3 and got[2]  # examples and skipped entries were compared


def test_text_files_directories_and_dataset_dicts_match_the_old_path(tmp_path, tok):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"hello world\n\n  \nw1 w2 \xff w3\r\nwhat is it w1 w2 w3 w4 w5\nlast")
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("hello world\nw1\n")
    (root / "sub" / "a.md").write_text("what is it")
    (root / "bad.txt").write_bytes(b"ok\n\x80")
    (root / "LICENSE").write_text("not a document")
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    datasets.disable_progress_bars()
    saved = tmp_path / "dd"
    datasets.DatasetDict(train=datasets.Dataset.from_list(TABLE[:2]),
                         test=datasets.Dataset.from_list(TABLE[1:])).save_to_disk(str(saved))
    for path, split in ((text, None), (root, None), (saved, None), (saved, "test")):
        for on_error in ("error", "skip"):
            assert_same(path, tok, tmp_path / "cache", max_length=5, overflow="chunk",
                        on_error=on_error, split=split)


def test_the_shipped_fixture_matches_with_a_byte_tokenizer(tmp_path):
    tok = byte_tokenizer()
    for overflow in ("truncate", "chunk"):
        got = assert_same(FIXTURE, tok, tmp_path, max_length=40, overflow=overflow)
    assert len(got[1]) > 13  # long documents became several windows


def random_corpus(rng: random.Random, n: int) -> bytes:
    """JSON Lines with every kind of record and of problem: bad JSON / UTF-8 / id, duplicate
    ids (also of a chunk window's id), empty or unknown fields, conversations, blank lines."""
    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    lines = []
    for i in range(n):
        rid = rng.choice([f"d{i}"] * 4 + [i, None, f"d{rng.randrange(i + 1)}",
                                          f"d{rng.randrange(i + 1)}#1", [1]])
        row = {} if rid is None else {"id": rid}
        c = rng.random()
        if c < 0.45:
            row["text"] = words(rng.randint(1, 14))
        elif c < 0.7:
            row.update(prompt=words(rng.randint(0, 10)), completion=words(rng.randint(1, 4)))
        elif c < 0.8:
            row["messages"] = CONVERSATION if rng.random() < 0.8 else CONVERSATION[:2]
        elif c < 0.9:
            row.update(rng.choice([{"text": " "}, {"prompt": "x"}, {"body": "x"}]))
        else:
            lines.append(rng.choice([b"[1]", b'{"text": ', b'{"text": "caf\xe9"}', b""]))
            continue
        lines.append(json.dumps(row).encode())
    return b"\n".join(lines)


def test_generated_corpora_match_the_old_path_in_every_policy(tmp_path, tok, chunks):
    rng = random.Random(0)
    outcomes = set()
    for trial in range(24):
        path = tmp_path / f"c{trial}.jsonl"
        path.write_bytes(random_corpus(rng, rng.randint(1, 50)))
        chunks(rng.choice([1, 3, 7, 50]))  # duplicates within and across chunks
        kw = dict(max_length=rng.choice([3, 6, 100]), on_error=rng.choice(["error", "skip"]),
                  overflow=rng.choice(["truncate", "chunk", "chunk", "error"]))
        outcomes.add(assert_same(path, tok, tmp_path / "cache", **kw)[0])
    assert outcomes == {"ok", "error"}


def test_a_pool_of_worker_processes_builds_the_same_corpus(tmp_path, tok, chunks, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_INLINE_BYTES", 0)  # a pool even for a small corpus
    chunks(5)
    path = tmp_path / "c.jsonl"
    path.write_bytes(random_corpus(random.Random(1), 120))
    got = assert_same(path, tok, tmp_path / "cache", num_proc=2, max_length=6,
                      overflow="chunk", on_error="skip")
    assert len(got[1]) > 40 and len(got[2]) > 10
    assert assert_same(path, tok, tmp_path / "cache", num_proc=2, max_length=6)[0] == "error"


def test_the_hash_index_finds_what_a_dict_of_lists_does():
    index, reference = _corpus_tables.HashIndex(), {}
    rng = np.random.default_rng(0)
    for step in range(200):  # few distinct keys: many repeats, as after hash collisions
        keys = rng.integers(0, 64, size=rng.integers(0, 20)).astype(np.uint64)
        rows = np.arange(len(keys)) + 100 * step
        index.add(keys, rows)
        for key, row in zip(keys.tolist(), rows.tolist()):
            reference.setdefault(key, []).append(row)
        probe = rng.integers(0, 80, size=30).astype(np.uint64)
        assert index.hits(probe).tolist() == [int(k) in reference for k in probe]
    assert len(index._keys) < 12  # merged into O(log n) sorted runs
    for key in range(80):
        assert sorted(index.rows(key)) == reference.get(key, [])


def test_hash_collisions_never_report_a_false_duplicate(tmp_path, tok, chunks, monkeypatch):
    # Three hash values for all ids: nearly every id collides with others, and only the exact
    # comparison behind an equal hash tells a duplicate from a collision.
    monkeypatch.setattr(_corpus_worker, "id_hashes", lambda encoded: np.array(
        [len(b) % 3 for b in encoded], dtype=np.uint64))
    rng = random.Random(2)
    for trial in range(6):
        path = tmp_path / f"c{trial}.jsonl"
        path.write_bytes(random_corpus(rng, 60))
        chunks(rng.choice([4, 60]))
        got = assert_same(path, tok, tmp_path / "cache", max_length=6, overflow="chunk",
                          on_error="skip")
        assert len(got[1]) > 20


# ----------------------------------------------------------------------------- the cache


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": "a", "text": "hello world"}, {"id": "b", "prompt": "what", "completion": "w1"},
        {"id": "c", "text": " "}]


def open_corpus(path, tok, cache, **kw):
    kw = {"max_length": 8, "on_error": "skip", **kw}
    return TokenizedCorpus.open_or_build(path, tok, cache_dir=cache, num_proc=1,
                                         progress=False, **kw)


def test_a_second_open_reuses_the_cache_without_tokenizing(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = open_corpus(path, tok, tmp_path / "cache")
    monkeypatch.setattr(corpus_mod, "build", lambda *a, **k: pytest.fail("tokenized again"))
    again = open_corpus(path, tok, tmp_path / "cache")
    assert again.path == first.path and again.path.parent == tmp_path / "cache" / "corpora"
    assert again.examples(range(2)) == first.examples(range(2)) and again.n_examples == 2
    by_folder = TokenizedCorpus.open(first.path)
    assert by_folder.examples(range(2)) == first.examples(range(2))
    assert by_folder.skipped == first.skipped and len(first.skipped) == 1


def test_the_key_follows_content_tokenizer_and_settings_but_not_the_path(tmp_path, tok,
                                                                         monkeypatch):
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = open_corpus(path, tok, cache)
    swapped_vocab = make_tokenizer()
    swapped_vocab.add_tokens(["zz"])
    variants = {
        "content": lambda: open_corpus(write_jsonl(tmp_path / "e.jsonl", ROWS[:2]), tok, cache),
        "chat template": lambda: open_corpus(path, make_tokenizer("{{ messages }}"), cache),
        "vocabulary": lambda: open_corpus(path, swapped_vocab, cache),
        "max_length": lambda: open_corpus(path, tok, cache, max_length=9),
        "overflow": lambda: open_corpus(path, tok, cache, overflow="chunk"),
        "on_error": lambda: open_corpus(write_jsonl(tmp_path / "f.jsonl", ROWS[:2]), tok,
                                        cache, on_error="error"),
        "add_eos": lambda: open_corpus(path, tok, cache, add_eos=True),
        "add_bos": lambda: open_corpus(path, tok, cache, add_bos=False),
        # The same tokens as the default (this tokenizer adds BOS itself and no EOS), but
        # another policy.
        "add_bos policy": lambda: open_corpus(path, tok, cache, add_bos=True),
        "add_eos policy": lambda: open_corpus(path, tok, cache, add_eos=False),
    }
    keys = {name: make().key for name, make in variants.items()}
    assert len(set(keys.values()) | {base.key}) == len(variants) + 1, keys

    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(path, moved)
    monkeypatch.setattr(corpus_mod, "build", lambda *a, **k: pytest.fail("tokenized again"))
    reused = open_corpus(moved, tok, cache)
    assert reused.key == base.key and reused.path == base.path
    assert reused.example(0).location == f"{moved}:1"  # where the corpus is now
    assert reused.skipped[0].location == f"{moved}:3"
    assert old_path(moved, tok, max_length=8, on_error="skip")[1:] == (
        [dataclasses.astuple(e) for e in reused.examples(range(2))],
        [dataclasses.astuple(s) for s in reused.skipped])


KILLED_BUILD = """
import functools, os, sys
from grass_llm.data import _corpus_build as B, corpus as C
from tests.test_data import make_tokenizer
original = B.Sequencer.apply
applied = []
def apply_then_die(self, result):
    original(self, result)
    applied.append(1)
    if len(applied) == 2:
        os._exit(9)  # killed mid-build: files half written
B.Sequencer.apply = apply_then_die
C.build = functools.partial(B.build, chunk_records=2, chunk_bytes=40)
C.TokenizedCorpus.open_or_build(sys.argv[1], make_tokenizer(), max_length=8, cache_dir=sys.argv[2],
                                num_proc=1, progress=False)
"""


def test_a_killed_build_leaves_no_trusted_cache_and_is_cleaned_up(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"w{i} w{i + 1}"} for i in range(9)])
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(path), str(cache)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    (left,) = (cache / "corpora").iterdir()
    assert left.name.startswith(".") and ".tmp-" in left.name and (left / "tokens.i32").exists()
    with pytest.raises(CorpusCacheError, match="not a tokenized corpus"):
        TokenizedCorpus.open(left)

    corpus = open_corpus(path, tok, cache)  # rebuilt from scratch, the leftover removed
    key = corpus.key
    assert [p.name for p in (cache / "corpora").iterdir()] == [key]
    assert new_path(path, tok, cache, max_length=8, on_error="skip")[1:] == \
        old_path(path, tok, max_length=8, on_error="skip")[1:]

    lengths = corpus.lengths.tolist()
    del corpus
    (cache / "corpora" / key / "lengths.i32").write_bytes(b"\0" * 3)  # a damaged folder...
    with pytest.raises(CorpusCacheError, match="damaged"):
        TokenizedCorpus.open(cache / "corpora" / key)
    assert open_corpus(path, tok, cache).lengths.tolist() == lengths  # ...is rebuilt too


def test_the_fingerprint_changes_with_any_id_token_label_or_boundary(tmp_path, tok, chunks):
    def fingerprint(name, rows, chunk=50, **kw):
        chunks(chunk)
        kw = {"add_bos": False, "add_eos": False, **kw}
        return open_corpus(write_jsonl(tmp_path / f"{name}.jsonl", rows), tok,
                           tmp_path / "cache", **kw).fingerprint

    rows = [{"id": "a", "text": "w1 w2"}, {"id": "b", "prompt": "w3 w4", "completion": "w5"}]
    base = fingerprint("base", rows)
    assert fingerprint("copy", rows, chunk=1) == base  # same data elsewhere, other chunks
    changed = {
        "id": [dict(rows[0], id="x"), rows[1]],
        "token": [dict(rows[0], text="w1 w9"), rows[1]],
        "label": [rows[0], {"id": "b", "prompt": "w3", "completion": "w4 w5"}],
        "boundary": [dict(rows[0], text="w1"), {"id": "b", "prompt": "w2 w3 w4",
                                                "completion": "w5"}],
    }
    prints = {name: fingerprint(name, r) for name, r in changed.items()}
    assert len(set(prints.values()) | {base}) == len(changed) + 1, prints


# ----------------------------------------------------------------------------- reads, edges


def test_reads_by_row_and_the_special_token_policy(tmp_path):
    tok = byte_tokenizer()  # adds no BOS itself
    corpus = open_corpus(FIXTURE, tok, tmp_path, max_length=64, on_error="error")
    old = tokenize_records(read_records(FIXTURE).records, tok, max_length=64).examples
    assert corpus.ids(2, 5) == [e.id for e in old[2:5]] and corpus.ids(5, 2) == []
    assert corpus.example(-1) == old[-1]
    with pytest.raises(IndexError, match="out of range"):
        corpus.example(len(old))
    assert corpus.text(3, tok) == tok.decode(old[3].input_ids)
    assert corpus.identity()["n_examples"] == len(old) == len(corpus)

    with_bos = open_corpus(FIXTURE, tok, tmp_path, max_length=64, add_bos=True)
    expected = tokenize_records(read_records(FIXTURE).records, tok, max_length=64,
                                add_bos=True).examples
    assert with_bos.examples(range(len(expected))) == expected
    assert expected[0].input_ids[0] == tok.bos_token_id != old[0].input_ids[0]
    # What the policy resolved to is recorded with the corpus (the store copies it).
    assert (corpus.special_tokens["bos"], corpus.special_tokens["eos"]) == ([], [])
    assert (with_bos.special_tokens["add_bos"], with_bos.special_tokens["bos"]) == \
        (True, [tok.bos_token_id])


def test_an_all_skipped_corpus_and_bad_arguments(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": " "}, {"body": "x"}])
    empty = open_corpus(path, tok, tmp_path / "cache")
    assert empty.n_examples == 0 and empty.n_tokens == 0 and empty.ids() == []
    assert len(TokenizedCorpus.open(empty.path).skipped) == 2
    for bad, match in (({"overflow": "wrap"}, "overflow"), ({"max_length": 0}, "max_length"),
                       ({"on_error": "ignore"}, "on_error")):
        with pytest.raises(ValueError, match=match):
            open_corpus(path, tok, tmp_path / "cache", **bad)
    with pytest.raises(DataError, match="no such file or directory"):
        open_corpus(tmp_path / "missing.jsonl", tok, tmp_path / "cache")


# ----------------------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_rank0_builds_rank1_maps_and_a_data_error_reaches_both(tmp_path, tok):
    rng = random.Random(3)
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"id": f"d{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))} if i % 3
        else {"id": f"d{i}", "prompt": "what is it", "completion": rng.choice(WORDS)}
        for i in range(41)])
    old = old_path(good, tok, max_length=6, overflow="chunk")
    assert old[0] == "ok" and len(old[1]) > 41  # long documents became several windows
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2])
    bad.write_text(bad.read_text() + '{"text": \n')
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "tests.corpus_ranks", str(tmp_path),
           str(good), str(bad), str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["builds"], r1["builds"]) == (1, 0)
    assert r0["path"] == r1["path"] and r0["fingerprint"] == r1["fingerprint"]
    assert [tuple(e) for e in r1["examples"]] == [tuple(e) for e in old[1]]
    message = f"{bad}:3: invalid JSON"
    assert r0["error"][0] == "DataError" and r0["error"][1].startswith(message)
    assert r1["error"][0] == "RankFailure"
    assert re.search(r"rank 0 failed while tokenizing the corpus: DataError: "
                     + re.escape(message), r1["error"][1])


# ----------------------------------------------------------------------------- host memory


MEASURE = """
import json, sys
from grass_llm.data.corpus import TokenizedCorpus
from tests.test_data import make_tokenizer

def peak_kib():  # VmHWM: this image's own peak (ru_maxrss would carry the parent's, see below)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

tok = make_tokenizer()
before = peak_kib()
corpus = TokenizedCorpus.open_or_build(sys.argv[1], tok, max_length=64, cache_dir=sys.argv[2],
                                       num_proc=1, progress=False)
print(json.dumps({"growth_kib": peak_kib() - before, "n_tokens": corpus.n_tokens}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_build_memory_stays_flat_as_the_corpus_grows(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(4)
    runs = []
    for n in (10_000, 100_000):
        path = tmp_path / f"c{n}.txt"
        with open(path, "w") as f:  # one document of 40 words per line
            for _ in range(n):
                f.write(" ".join(rng.choices(WORDS, k=40)) + "\n")
        done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(tmp_path / "c")],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    extra_tokens = runs[1]["n_tokens"] - runs[0]["n_tokens"]  # 90k documents, ~3.8M tokens
    extra_mib = (runs[1]["growth_kib"] - runs[0]["growth_kib"]) / 1024
    # Peak RSS is the child's VmHWM: Linux carries into ru_maxrss the peak of the image before
    # exec (this pytest process's), which would hide any growth smaller than that.
    # Holding the extra tokens as the old path does (Example.input_ids and .labels: Python
    # lists, 8-byte pointers each, not counting the int objects) costs >= 16 bytes per token,
    # ~58 MiB here (the old path measured ~150 MiB). The build holds 16 bytes per record (the
    # id-hash index, ~1.4 MiB here; measured growth 3-6 MiB with allocator noise); a third of
    # the list cost leaves room for that noise while anything per token shows up over it.
    list_cost_mib = 16 * extra_tokens / 2**20
    assert extra_mib < list_cost_mib / 3, (extra_mib, list_cost_mib, runs)
