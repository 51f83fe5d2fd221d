"""The corpus content hash and its cache: an unchanged corpus is read once, any change (even one
that keeps the size) is hashed again, and a file written just now is never remembered."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from grass_llm.data import content
from grass_llm.data.content import content_hash


def _age(path, seconds: float = 3600.0) -> None:
    """Sets a file's modification time ``seconds`` in the past (past the racy window)."""
    old = time.time() - seconds
    os.utime(path, (old, old))


@pytest.fixture
def counted(monkeypatch):
    """Counts the reads of file bytes (calls of ``hash_files``)."""
    calls = []
    real = content.hash_files

    def counting(files):
        calls.append([str(f) for _, f in files])
        return real(files)

    monkeypatch.setattr(content, "hash_files", counting)
    return calls


def test_the_hash_is_blake2b_of_the_bytes(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a"}\n' * 1000)
    expected = hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()
    assert content_hash(f) == (expected, f.stat().st_size)


def test_an_unchanged_file_is_read_once_and_a_same_size_rewrite_again(tmp_path, counted):
    f, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    f.write_bytes(b"aaaa\n" * 100)
    _age(f)
    first = content_hash(f, cache=cache)
    assert content_hash(f, cache=cache) == first and len(counted) == 1
    f.write_bytes(b"bbbb\n" * 100)  # the same size, other bytes, a new modification time
    _age(f, 1800.0)
    second = content_hash(f, cache=cache)
    assert len(counted) == 2 and second != first and second == content_hash(f)
    assert second[1] == first[1] == 500


def test_a_file_written_just_now_is_not_remembered(tmp_path, counted):
    f, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    f.write_bytes(b"fresh\n")
    content_hash(f, cache=cache)
    content_hash(f, cache=cache)
    assert len(counted) == 2 and not cache.exists()


def test_a_folder_is_keyed_by_every_file(tmp_path, counted):
    d, cache = tmp_path / "corpus", tmp_path / "cache"
    d.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (d / name).write_bytes(name.encode() * 10)
        _age(d / name)
    first = content_hash(d, cache=cache)
    assert content_hash(d, cache=cache) == first and len(counted) == 1
    (d / "c.jsonl").write_bytes(b"new")  # a file added
    _age(d / "c.jsonl")
    assert content_hash(d, cache=cache) != first and len(counted) == 2


def test_a_damaged_entry_is_hashed_again(tmp_path, counted):
    f, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    f.write_bytes(b"x\n" * 10)
    _age(f)
    first = content_hash(f, cache=cache)
    entry, = cache.iterdir()
    entry.write_text("{not json")
    assert content_hash(f, cache=cache) == first and len(counted) == 2


def test_a_resumed_open_of_the_tokenized_corpus_does_not_read_the_data(tmp_path, counted):
    from grass_llm.data import TokenizedCorpus
    from tests.test_data import make_tokenizer

    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "text": "hello world"}\n{"id": "b", "text": "what is it"}\n')
    _age(f)
    opened = [TokenizedCorpus.open_or_build(f, make_tokenizer(), max_length=16,
                                            cache_dir=tmp_path / "cache", num_proc=1,
                                            progress=False) for _ in range(2)]
    assert opened[0].key == opened[1].key and opened[1].n_examples == 2
    assert len(counted) == 1 and (tmp_path / "cache" / "content").is_dir()
