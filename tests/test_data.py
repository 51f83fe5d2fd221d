"""grass_llm.data: corpus readers, tokenization into labelled examples, batching and collation.

The tokenizer is a tiny word-level one built in code (no download): words split on whitespace,
BOS added by the post-processor, and a simple Jinja chat template whose render of a conversation
is ``<|role|> content </s>`` per message, so expected token ids can be written down by hand.
"""

import json
import random
from collections.abc import Mapping

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grass_llm.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Record,
    collate,
    read_records,
    token_budget_batches,
    tokenize_records,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
WORDS = ["hello", "world", "what", "is", "it", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
ROWS = [{"id": "doc-a", "text": "hello world", "n": 1},
        {"id": "doc-b", "text": "w1 w2 w3", "n": 2},
        {"id": "doc-c", "text": "what is it", "n": 3}]


def make_tokenizer(chat_template=CHAT_TEMPLATE, adds=("bos",), eos_token="</s>"):
    """The word-level tokenizer; ``adds``: what ``tokenizer(text)`` puts around a text by
    itself (its post-processor): "bos" in front, "eos" at the end; ``eos_token=None``: a
    tokenizer that defines no EOS token."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(200)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds:
        front, back = ("<s> " if "bos" in adds else ""), (" </s>" if "eos" in adds else "")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{front}$A{back}", pair=f"{front}$A $B{back}",
            special_tokens=[("<s>", BOS), ("</s>", EOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos_token,
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def word_ids(tok, text):
    """Reference ids of whitespace-separated words, looked up one by one in the vocabulary."""
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


def text_record(text, rid="r", **extra):
    return Record(rid, {"text": text, **extra}, f"mem:{rid}")


# ----------------------------------------------------------------------------- readers


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_corpus(tmp_path, fmt, rows):
    """Writes ``rows`` in ``fmt``; returns (path, expected location of row 0)."""
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        write_jsonl(path, rows)
        return path, f"{path}:1"
    if fmt in ("json-list", "json-data"):
        path = tmp_path / "data.json"
        body = json.dumps(rows, indent=1)
        path.write_text(body if fmt == "json-list" else '{"data": ' + body + "}")
        return path, f"{path}:2 (record 0)"
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
        import pyarrow.parquet as pq
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
        return path, f"{path}:row 0"
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    datasets.disable_progress_bars()
    path = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path, f"{path}:row 0"


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-data", "parquet", "hf"])
def test_each_format_round_trips_the_records(tmp_path, fmt):
    path, first_location = write_corpus(tmp_path, fmt, ROWS)
    result = read_records(path)  # format="auto"
    assert [r.fields for r in result.records] == ROWS
    assert [r.id for r in result.records] == ["doc-a", "doc-b", "doc-c"]
    assert result.records[0].location == first_location
    assert result.skipped == []
    explicit = {"json-list": "json", "json-data": "json"}.get(fmt, fmt)
    assert read_records(path, format=explicit).records == result.records


def test_ids_default_to_the_record_index_and_given_ids_become_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    # With a UTF-8 byte-order mark, which some editors write and json.loads would reject.
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n'
                     b'{"id": 7, "text": "b"}\n{"id": null, "text": "c"}\n')
    result = read_records(path)
    assert [r.id for r in result.records] == ["0", "7", "2"]
    assert [r.location for r in result.records] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_text_file_is_one_document_per_non_blank_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world\n\n   \nw1 w2\r\nlast")
    result = read_records(path)
    assert [r.fields for r in result.records] == [{"text": "hello world"}, {"text": "w1 w2"},
                                                  {"text": "last"}]
    assert [r.id for r in result.records] == ["0", "1", "2"]
    assert [r.location for r in result.records] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_text_dir_is_one_document_per_file_with_relative_path_ids(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("hello world\nw1\n")
    (root / "sub" / "a.md").write_text("# what is it")
    (root / "LICENSE").write_text("not a document")
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("hidden: not looked at")
    result = read_records(root)
    assert [(r.id, r.fields) for r in result.records] == [
        ("b.txt", {"text": "hello world\nw1\n"}), ("sub/a.md", {"text": "# what is it"})]
    assert result.records[1].location == str(root / "sub" / "a.md")
    assert [(s.id, s.reason) for s in result.skipped] == [("LICENSE", "not a .txt/.md file")]


def test_saved_dataset_dict_reads_train_or_the_named_split(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    datasets.disable_progress_bars()
    path = tmp_path / "dd"
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:2]),
                         test=datasets.Dataset.from_list(ROWS[2:])).save_to_disk(str(path))
    assert [r.fields for r in read_records(path).records] == ROWS[:2]
    test = read_records(path, split="test").records
    assert [r.fields for r in test] == ROWS[2:] and test[0].location == f"{path}[test]:row 0"
    with pytest.raises(DataError, match="no split 'dev'"):
        read_records(path, split="dev")


def test_missing_path_and_unknown_extension_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory") as err:
        read_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv.*extension '\.csv'"):
        read_records(tmp_path / "d.csv")
    with pytest.raises(DataError, match="needs a directory"):
        read_records(tmp_path / "d.csv", format="textdir")
    with pytest.raises(ValueError, match="on_error"):
        read_records(tmp_path / "d.csv", on_error="ignore")


GOOD = b'{"id": "a", "text": "x"}\n'
# (file body, 1-based bad line, fragment of the reason)
BAD_JSONL = {
    "invalid-json": (GOOD + b'{"id": "b", "text": \n', 2, "invalid JSON"),
    # 0xe9 (latin-1 e-acute) is at 25 (line 1) + 13 (b'{"text": "caf') bytes.
    "not-utf8": (GOOD + b'{"text": "caf\xe9"}\n', 2,
                 "invalid UTF-8 byte 0xe9 at byte offset 38 of the file (byte 13 of the line)"),
    "not-an-object": (GOOD + b"\n[1, 2]\n", 3, "expected a JSON object, found an array"),
    "duplicate-id": (GOOD + b'{"id": "a", "text": "y"}\n', 2, "duplicate id 'a'"),
    "bad-id-type": (GOOD + b'{"id": [1], "text": "y"}\n', 2, "field 'id' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_records_raise_or_are_skipped(tmp_path, case):
    body, line, fragment = BAD_JSONL[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(body + b'{"id": "z", "text": "end"}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert f"{path}:{line}: " in str(err.value) and fragment in str(err.value)
    assert "on_error='skip'" in str(err.value)  # says what to do
    result = read_records(path, on_error="skip")
    assert [r.id for r in result.records] == ["a", "z"]
    assert len(result.skipped) == 1
    assert result.skipped[0].location == f"{path}:{line}" and fragment in result.skipped[0].reason


def test_bad_records_in_other_formats_name_their_line_or_row(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  "oops",\n  {"text": "b"}\n]')
    with pytest.raises(DataError, match=rf"{path}:3 \(record 1\): expected a JSON object"):
        read_records(path)
    assert [r.id for r in read_records(path, on_error="skip").records] == ["0", "2"]

    text = tmp_path / "corpus.txt"
    text.write_bytes(b"fine\nbad \xff byte\nfine too\n")
    with pytest.raises(DataError, match=rf"{text}:2: invalid UTF-8 byte 0xff at byte offset 9 "
                                        r"of the file \(byte 4 of the line\)"):
        read_records(text)
    assert [r.fields["text"] for r in read_records(text, on_error="skip").records] == [
        "fine", "fine too"]

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_bytes(b"ok\nok\n\x80")
    (root / "b.txt").write_text("fine")
    with pytest.raises(DataError, match=rf"{root / 'a.txt'}:3: invalid UTF-8 byte 0x80 at byte "
                                        r"offset 6"):
        read_records(root)
    skip = read_records(root, on_error="skip")
    assert [r.id for r in skip.records] == ["b.txt"] and skip.skipped[0].id == "a.txt"


def test_duplicate_ids_in_parquet_name_the_row(tmp_path):
    path, _ = write_corpus(tmp_path, "parquet", ROWS + [dict(ROWS[1], n=9)])
    with pytest.raises(DataError, match=rf"{path}:row 3: duplicate id 'doc-b' \(first used at "
                                        rf"{path}:row 1\)"):
        read_records(path)
    assert len(read_records(path, on_error="skip").records) == 3


def test_a_broken_json_document_raises_under_either_policy(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
            read_records(path, on_error=policy)
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match="expected a top-level list"):
        read_records(path)


# ----------------------------------------------------------------------------- tokenization


def test_text_document_is_all_targets_with_the_tokenizers_own_specials(tok):
    # This tokenizer adds BOS itself and no EOS (as Llama's does): the default does the same.
    ex, = tokenize_records([text_record("hello world w5")], tok).examples
    assert ex.input_ids == tok("hello world w5")["input_ids"]
    assert ex.input_ids == [BOS] + word_ids(tok, "hello world w5")
    assert ex.labels == ex.input_ids and ex.id == "r" and ex.location == "mem:r"
    with_eos, = tokenize_records([text_record("hello world")], tok, add_eos=True).examples
    assert with_eos.input_ids == with_eos.labels == [BOS] + word_ids(tok, "hello world") + [EOS]


def test_prompt_tokens_are_masked_exactly(tok):
    record = Record("p", {"prompt": "what is it", "completion": "hello world"}, "mem:p")
    ex, = tokenize_records([record], tok).examples
    prompt, completion = word_ids(tok, "what is it"), word_ids(tok, "hello world")
    assert ex.input_ids == [BOS] + prompt + completion
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt)) + completion
    ex, = tokenize_records([record], tok, add_eos=True).examples
    assert ex.input_ids == [BOS] + prompt + completion + [EOS]
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt)) + completion + [EOS]
    empty_prompt = Record("q", {"prompt": "", "completion": "w1"}, "mem:q")
    ex, = tokenize_records([empty_prompt], tok).examples
    assert (ex.input_ids, ex.labels) == ([BOS, tok.convert_tokens_to_ids("w1")],
                                         [IGNORE_INDEX, tok.convert_tokens_to_ids("w1")])


CONVERSATION = [{"role": "system", "content": "w0"},
                {"role": "user", "content": "what is it"},
                {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "w3"}]


def test_chat_targets_only_assistant_content_and_end_of_turn(tok):
    ex, = tokenize_records([Record("c", {"messages": CONVERSATION}, "mem:c")], tok).examples
    whole = tok.apply_chat_template(CONVERSATION, tokenize=True)
    whole = whole["input_ids"] if isinstance(whole, Mapping) else whole
    assert ex.input_ids == list(whole)
    # Independent reference: the template renders "<|role|> content </s>" per message; of an
    # assistant turn, the content and "</s>" (the special end-of-turn token) are targets, its
    # header "<|assistant|>" is not. The probe letters are unknown words here (one <unk> id),
    # so the turn's own content is what the header is found against.
    ids, labels = [], []
    for m in CONVERSATION:
        header, content = word_ids(tok, f"<|{m['role']}|>"), word_ids(tok, m["content"])
        ids += header + content + [EOS]
        if m["role"] == "assistant":
            labels += [IGNORE_INDEX] * len(header) + content + [EOS]
        else:
            labels += [IGNORE_INDEX] * (len(header) + len(content) + 1)
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_chat_needs_a_template_and_a_prefix_stable_one():
    record = Record("c", {"messages": CONVERSATION}, "mem:c")
    for policy in ("error", "skip"):  # a tokenizer problem, not a record's: always raised
        with pytest.raises(DataError, match="mem:c: .*needs a chat template.*has none"):
            tokenize_records([record], make_tokenizer(chat_template=None), on_error=policy)
    unstable = make_tokenizer("{% for m in messages %}{{ m['content'] }} "
                              "{% if loop.last %}</s>{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="mem:c: the chat template renders messages"):
        tokenize_records([record], unstable)
    assert tokenize_records([record], unstable, on_error="skip").examples == []


BAD_RECORDS = {
    "empty-text": ({"text": "  "}, "field 'text' is empty"),
    "unknown-fields": ({"body": "x", "title": "y"},
                       "no known field: found ['body', 'title'], expected 'text' or "
                       "'prompt+completion' or 'messages'"),
    "non-string": ({"text": 3}, "field 'text' must be a string, found int"),
    "half-pair": ({"prompt": "hello"}, "field 'completion' is missing"),
    "empty-completion": ({"prompt": "hello", "completion": ""}, "field 'completion' is empty"),
    "ambiguous": ({"text": "a", "messages": []}, "ambiguous record"),
    "bad-message": ({"messages": [{"role": "user", "content": 5}]},
                    "messages[0].content must be a string"),
    "no-assistant": ({"messages": CONVERSATION[:2]}, "no target tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_raise_with_location_or_are_skipped(tok, case):
    fields, reason = BAD_RECORDS[case]
    records = [text_record("hello", "ok1"), Record("bad", fields, "data.jsonl:2"),
               text_record("world", "ok2")]
    with pytest.raises(DataError) as err:
        tokenize_records(records, tok)
    assert str(err.value).startswith("data.jsonl:2: ") and reason in str(err.value)
    result = tokenize_records(records, tok, on_error="skip")
    assert [e.id for e in result.examples] == ["ok1", "ok2"]
    (skipped,) = result.skipped
    assert (skipped.id, skipped.location) == ("bad", "data.jsonl:2") and reason in skipped.reason


def long_text(n):
    return " ".join(f"w{i}" for i in range(n))


def test_truncate_keeps_the_first_tokens(tok):
    full, = tokenize_records([text_record(long_text(20))], tok).examples
    cut, = tokenize_records([text_record(long_text(20))], tok, max_length=8).examples
    assert cut.input_ids == full.input_ids[:8] and cut.labels == full.labels[:8]
    long_prompt = Record("p", {"prompt": long_text(10), "completion": "hello"}, "data.jsonl:4")
    with pytest.raises(DataError, match=r"data.jsonl:4: no target tokens left after truncation "
                                        r"to max_length=8 \(the first target is token 11\)"):
        tokenize_records([long_prompt], tok, max_length=8)
    assert tokenize_records([long_prompt], tok, max_length=8, on_error="skip").examples == []


def test_chunk_splits_into_windows_and_drops_target_less_ones(tok):
    full, = tokenize_records([text_record(long_text(20), "d")], tok).examples  # 21 tokens
    windows = tokenize_records([text_record(long_text(20), "d")], tok, max_length=8,
                               overflow="chunk").examples
    assert [w.id for w in windows] == ["d#0", "d#1", "d#2"]
    assert [len(w.input_ids) for w in windows] == [8, 8, 5]
    assert sum((w.input_ids for w in windows), []) == full.input_ids
    assert sum((w.labels for w in windows), []) == full.labels

    record = Record("p", {"prompt": long_text(17), "completion": "hello world"}, "mem:p")
    whole, = tokenize_records([record], tok, add_eos=True).examples  # 18 prompt + 3 targets
    result = tokenize_records([record], tok, max_length=8, overflow="chunk", add_eos=True)
    assert [w.id for w in result.examples] == ["p#2"]
    assert result.examples[0].labels == whole.labels[16:]
    assert [(s.id, s.reason) for s in result.skipped] == [
        ("p#0", "window 0 (tokens 0..7) has no target token"),
        ("p#1", "window 1 (tokens 8..15) has no target token")]
    short, = tokenize_records([text_record("hello", "s")], tok, max_length=8,
                              overflow="chunk").examples
    assert short.id == "s"  # a document that fits is not renamed


def test_overflow_error_raises_and_chunk_ids_must_stay_unique(tok):
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=r"mem:r: 21 tokens exceed max_length=8"):
            tokenize_records([text_record(long_text(20))], tok, max_length=8,
                             overflow="error", on_error=policy)
    clash = [text_record("hello", "d#1"), text_record(long_text(20), "d")]
    with pytest.raises(DataError, match="duplicate example id 'd#1'"):
        tokenize_records(clash, tok, max_length=8, overflow="chunk")


# ----------------------------------------------------------------------------- batching


def set_partitions(items):
    """Every partition of ``items`` into non-empty blocks (plain recursion; Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


def feasible(batch, lengths, max_tokens, max_batch):
    if len(batch) == 1:
        return True
    size_ok = max_batch is None or len(batch) <= max_batch
    return size_ok and len(batch) * max(lengths[i] for i in batch) <= max_tokens


def check_batches(batches, lengths, max_tokens, max_batch):
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert feasible(b, lengths, max_tokens, max_batch)
    order = [i for b in batches for i in b]
    assert order == sorted(range(len(lengths)), key=lambda i: lengths[i])  # bucketed, stable


def test_budget_batches_are_valid_and_as_few_as_brute_force_finds():
    rng = random.Random(0)
    for trial in range(150):
        n = rng.randint(0, 7)
        lengths = [rng.randint(0, 12) for _ in range(n)]
        max_tokens = rng.randint(1, 30)
        max_batch = rng.choice([None, 1, 2, 3])
        batches = token_budget_batches(lengths, max_tokens, max_batch=max_batch)
        check_batches(batches, lengths, max_tokens, max_batch)
        fewest = min(len(p) for p in set_partitions(list(range(n)))
                     if all(feasible(b, lengths, max_tokens, max_batch) for b in p))
        assert len(batches) == fewest, (lengths, max_tokens, max_batch)


def test_budget_batches_on_a_larger_input_and_bad_arguments():
    rng = random.Random(1)
    lengths = [rng.randint(1, 600) for _ in range(2000)]
    batches = token_budget_batches(lengths, 4096, max_batch=32)
    check_batches(batches, lengths, 4096, 32)
    assert token_budget_batches([5, 100, 5], 50) == [[0, 2], [1]]  # the long one alone
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches([1], 0)
    with pytest.raises(ValueError, match=r"lengths\[1\] is negative"):
        token_budget_batches([1, -2], 10)


def test_collate_pads_right_and_left():
    examples = [Example("a", [5, 6, 7], [-100, 6, 7], "x"), Example("b", [8], [8], "y")]
    right = collate(examples, pad_id=PAD)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in right.values())
    left = collate(examples, pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    with pytest.raises(ValueError, match="'b' .* 1 input_ids but 2 labels"):
        collate([Example("b", [1], [1, 2], "y")], PAD)


def test_read_tokenize_batch_collate_end_to_end(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"text": long_text(n)} for n in (3, 9, 4, 1)]
                + [{"prompt": "what", "completion": "hello"}])
    examples = tokenize_records(read_records(path).records, tok).examples
    lengths = [len(e.input_ids) for e in examples]
    batches = token_budget_batches(lengths, max_tokens=16)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        batch = collate([examples[i] for i in b], tok.pad_token_id)
        assert batch["input_ids"].numel() <= 16 or len(b) == 1
        for row, i in enumerate(b):
            n = lengths[i]
            assert batch["input_ids"][row, :n].tolist() == examples[i].input_ids
            assert batch["attention_mask"][row].sum().item() == n
