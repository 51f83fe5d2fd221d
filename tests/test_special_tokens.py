"""Special tokens: the policy resolves to what the tokenizer itself adds, the store records it,
queries use it; and the regression test of the bug it fixes, on a model trained without EOS.

The regression fixture: a tiny Llama trained from scratch on N one-fact documents
("<name> lives in <city> ." / "<name> owns a <pet> ."), each fact stated in exactly one
document, encoded as its tokenizer encodes them (``tokenizer(text)``: BOS in front, no EOS,
as Llama's tokenizer does, though it defines EOS). A query asks for one fact (prompt
"<name> lives in", completion "<city>"). ``cache`` (FactGraSS) -> ``fisher`` -> ``query``,
through the CLI: with the default policy the stating document comes first for most queries;
with ``add_eos: true`` every document and completion ends in an EOS the model was never
trained to predict, whose loss (NLL ~10 nats, against ~0.01 for the answer) swamps every
gradient, and attribution fails.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from grass_llm.cli import app
from grass_llm.data import Record, tokenize_records
from grass_llm.data.specials import (
    Specials,
    describe_special_tokens,
    recorded_policy,
    special_tokens_record,
)
from grass_llm.models import tiny_model
from grass_llm.store import open_store
from grass_llm.store.layout import StoreLayout
from grass_llm.store.runid import store_identity
from tests.test_data import BOS, EOS, make_tokenizer, word_ids

N_FACTS = 60
TRAIN_STEPS = 200
COMPRESSOR = "factgrass:k=64,k_in=8,k_out=8"
_SYLLABLES = ("ba", "ko", "mi", "ru", "te", "sa", "lo", "ne", "vi", "da", "fu", "ga", "ho", "ji",
              "pe", "zo")
_RELATIONS = (("lives in", [f"city{i}" for i in range(12)]),
              ("owns a", [f"pet{i}" for i in range(12)]))


# ----------------------------------------------------------------------------- the policy


def test_the_default_adds_what_the_tokenizer_adds_and_true_false_override_it():
    text = [Record("r", {"text": "hello world"}, "mem:r")]
    pair = [Record("p", {"prompt": "what is", "completion": "it"}, "mem:p")]
    words, prompt, completion = (word_ids(make_tokenizer(), t) for t in
                                 ("hello world", "what is", "it"))
    cases = {  # (what tokenizer(text) adds, add_bos, add_eos) -> (BOS?, EOS?)
        (("bos",), None, None): (True, False),  # Llama-like: BOS in front, no EOS
        (("bos",), False, True): (False, True),
        (("bos", "eos"), None, None): (True, True),  # a tokenizer that ends texts with EOS
        (("bos", "eos"), None, False): (True, False),
        ((), None, None): (False, False),  # GPT-2 / SmolLM2-like: nothing
        ((), True, True): (True, True),
    }
    for (adds, add_bos, add_eos), (bos, eos) in cases.items():
        tok = make_tokenizer(adds=adds)
        head, tail = [BOS] * bos, [EOS] * eos
        ex, = tokenize_records(text, tok, add_bos=add_bos, add_eos=add_eos).examples
        assert ex.input_ids == ex.labels == head + words + tail, adds
        if add_bos is None and add_eos is None:
            assert ex.input_ids == tok("hello world")["input_ids"]  # exactly as tokenizer(text)
        ex, = tokenize_records(pair, tok, add_bos=add_bos, add_eos=add_eos).examples
        assert ex.input_ids == head + prompt + completion + tail
        assert ex.labels == [-100] * (len(head) + len(prompt)) + completion + tail


def test_a_policy_the_tokenizer_cannot_follow_is_a_clear_error():
    no_eos = make_tokenizer(eos_token=None)
    record = [Record("r", {"text": "hello"}, "mem:r")]
    with pytest.raises(ValueError, match="add_eos=True, but the tokenizer has no EOS token"):
        tokenize_records(record, no_eos, add_eos=True)
    assert tokenize_records(record, no_eos).examples[0].input_ids[-1] != EOS
    with pytest.raises(ValueError, match="add_bos must be true, false or null"):
        tokenize_records(record, make_tokenizer(), add_bos=1)


def test_the_line_says_which_tokens_are_added_and_which_are_targets():
    llama_like = special_tokens_record(make_tokenizer(), add_bos=None, add_eos=None)
    assert describe_special_tokens(llama_like) == (
        "special tokens: BOS '<s>' added, not a target (as the tokenizer does); EOS not added "
        "(the tokenizer does not add it; add_eos: true adds it as a target); chat messages: as "
        "their template renders them")
    forced = special_tokens_record(make_tokenizer(adds=()), add_bos=False, add_eos=True)
    assert describe_special_tokens(forced).startswith(
        "special tokens: BOS not added (add_bos: false); EOS '</s>' added as a target after "
        "documents and completions (add_eos: true);")
    none = special_tokens_record(make_tokenizer(eos_token=None), add_bos=None, add_eos=None)
    assert "EOS not added (the tokenizer has no EOS token);" in describe_special_tokens(none)
    assert describe_special_tokens(None).startswith("special tokens: not recorded")


def test_queries_get_the_tokens_the_store_recorded_and_old_stores_keep_eos():
    tok = make_tokenizer()
    record = special_tokens_record(tok, add_bos=None, add_eos=True)
    assert record["bos"] == [BOS] and record["eos"] == [EOS]
    assert recorded_policy({"special_tokens": record}, tok) == {"add_bos": True, "add_eos": True}
    default = special_tokens_record(tok, add_bos=None, add_eos=None)
    assert recorded_policy({"special_tokens": default}, tok) == {"add_bos": True,
                                                                 "add_eos": False}
    # A store of an older version recorded nothing: its corpus had EOS after every document.
    assert recorded_policy({"config": {}}, tok) == {"add_bos": True, "add_eos": True}
    assert recorded_policy({}, make_tokenizer(eos_token=None))["add_eos"] is False
    other = make_tokenizer(adds=())  # a tokenizer that gives no BOS where the store had one
    with pytest.raises(ValueError, match="not the ones the store's corpus got"):
        recorded_policy({"special_tokens": {**default, "bos": [7]}}, other)
    assert Specials.of(tok, None, None) == Specials([BOS], [])


def test_the_config_fields_take_true_false_or_null_and_nothing_else():
    from grass_llm.config import load_config
    from grass_llm.fit_mask import config_from_cli

    base = ["model=tiny:llama", "data=d.jsonl", "out=o.zarr"]
    assert load_config(None, base).add_eos is None  # the default: as the tokenizer does
    cfg = load_config(None, base + ["add_eos=true", "add_bos=false"])
    assert (cfg.add_bos, cfg.add_eos) == (False, True)
    assert "add_eos" in cfg.identity_dict()  # a different policy is a different run
    with pytest.raises(ValueError, match="add_eos must be true, false or null"):
        load_config(None, base + ["add_eos=yes please"])
    fit = config_from_cli({"model": "tiny:llama", "data": "d", "targets": "t", "out": "m"},
                          ["add_eos=true"])
    assert fit.add_eos is True and fit.add_bos is None
    with pytest.raises(ValueError, match="add_bos must be true, false or null"):
        config_from_cli({"model": "tiny:llama", "data": "d", "targets": "t", "out": "m"},
                        ["add_bos=2"])


# ----------------------------------------------------------------------------- the fixture


def _facts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(name, relation, object)`` for n people with made-up one-token names."""
    rng = np.random.default_rng(seed)
    names = rng.choice([a + b for a in _SYLLABLES for b in _SYLLABLES if a != b], n,
                       replace=False)
    return [(str(name), _RELATIONS[i % 2][0], str(rng.choice(_RELATIONS[i % 2][1])))
            for i, name in enumerate(names)]


def _tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level; ``tokenizer(text)`` puts BOS in front and no EOS, though EOS exists."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _train(tok, texts: list[str]) -> torch.nn.Module:
    """A tiny Llama trained from scratch, full batch, on the texts as ``tokenizer(text)``
    encodes them (no EOS ever)."""
    seqs = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    labels = ids.masked_fill(mask == 0, -100)
    model = tiny_model("llama", seed=0, vocab_size=len(tok), hidden_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=4, intermediate_size=128,
                       max_positions=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(TRAIN_STEPS):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def fact_run(tmp_path_factory):
    """The trained model's directory, the corpus, the queries (query i asks for the fact of
    document i), and the corpus cache folder."""
    root = tmp_path_factory.mktemp("facts")
    facts = _facts(N_FACTS)
    docs = [{"id": f"doc{i}", "text": f"{n} {r} {o} ."} for i, (n, r, o) in enumerate(facts)]
    tok = _tokenizer(sorted({w for d in docs for w in d["text"].split()}))
    model = _train(tok, [d["text"] for d in docs])
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    queries = [{"id": f"q{i}", "prompt": f"{n} {r}", "completion": o}
               for i, (n, r, o) in enumerate(facts)]
    return {"model": str(root / "model"), "data": _write_jsonl(root / "docs.jsonl", docs),
            "queries": _write_jsonl(root / "queries.jsonl", queries), "root": root}


def _cache_args(run, out, *extra):
    return ["cache", "--set", f"model={run['model']}", "--set", f"data={run['data']}",
            "--set", f"out={out}", "--set", f"compressor={COMPRESSOR}", "--set",
            "max_length=16", "--set", "chunk_rows=16", "--set", "store_dtype=float32",
            "--quiet", *extra]


def _top1(run, name, *extra) -> tuple[float, str, str]:
    """The fraction of queries whose top document states their fact, through the CLI, and
    the outputs of ``cache`` and ``info``."""
    runner, out = CliRunner(), str(run["root"] / f"{name}.zarr")
    cached = runner.invoke(app, _cache_args(run, out, *extra), terminal_width=250)
    assert cached.exit_code == 0, cached.output
    res = runner.invoke(app, ["fisher", out], terminal_width=250)
    assert res.exit_code == 0, res.output
    found = run["root"] / f"{name}.jsonl"
    res = runner.invoke(app, ["query", out, "--queries", run["queries"], "--top-k", "1",
                              "--out", str(found), "--device", "cpu"], terminal_width=250)
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in found.read_text().splitlines()]
    hits = [line["top"][0]["id"] == "doc" + line["query"][1:] for line in lines]
    assert len(hits) == N_FACTS
    info = runner.invoke(app, ["info", out], terminal_width=250)
    assert info.exit_code == 0, info.output
    return float(np.mean(hits)), cached.output, " ".join(info.output.split())  # rich wraps


def test_default_policy_finds_the_stating_document_and_an_unlearned_eos_does_not(
        fact_run, monkeypatch):
    monkeypatch.setenv("GRASS_LLM_CACHE", str(fact_run["root"] / "cache"))
    default, cached, info = _top1(fact_run, "default")
    line = ("special tokens: BOS '<s>' added, not a target (as the tokenizer does); EOS not "
            "added (the tokenizer does not add it; add_eos: true adds it as a target); chat "
            "messages: as their template renders them")
    assert cached.count("special tokens:") == 1 and line in cached
    assert line in info  # `info` shows the store's policy
    with_eos, cached, info = _top1(fact_run, "eos", "--set", "add_eos=true")
    assert "EOS '</s>' added as a target after documents and completions (add_eos: true)" \
        in cached and "(add_eos: true)" in info
    print(f"top-1 = the stating document: default policy {default:.3f}, add_eos=true "
          f"{with_eos:.3f} ({N_FACTS} facts)")
    # Measured (60 facts, 200 steps): 0.933 (56/60) with the default policy, 0.100 (6/60)
    # with add_eos=true; the 120-fact run: 0.82 and 0.06. The bounds leave room for
    # other thread counts' rounding in training, while scoring the EOS cannot pass the first
    # and a pipeline that ignored add_eos could not pass the second.
    assert default >= 0.8
    assert with_eos <= 0.4


def test_a_store_of_a_version_before_the_policy_is_refused_naming_the_fields(
        fact_run, monkeypatch, tmp_path):
    monkeypatch.setenv("GRASS_LLM_CACHE", str(fact_run["root"] / "cache"))
    out = str(tmp_path / "old.zarr")
    runner = CliRunner()
    res = runner.invoke(app, _cache_args(fact_run, out), terminal_width=250)
    assert res.exit_code == 0, res.output
    group = zarr.open_group(out, mode="r+")  # as an older version wrote it: no policy fields
    meta = dict(group.attrs["meta"])
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("add_bos",
                                                                          "add_eos")}
    del meta["special_tokens"]
    layout = StoreLayout.from_attrs(group.attrs["layout"])
    group.attrs.update({"meta": meta, "identity": store_identity(layout, meta)})
    res = runner.invoke(app, _cache_args(fact_run, out), terminal_width=250)
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    for field in ("meta.config.add_bos (absent -> None)", "meta.config.add_eos (absent -> None)",
                  "meta.special_tokens", "written by an older version"):
        assert field in text, text
    # Its queries are still tokenized as its corpus was then: with EOS.
    assert recorded_policy(open_store(out).meta, _tokenizer([]))["add_eos"] is True


def test_a_query_store_with_other_special_tokens_is_refused(fact_run, monkeypatch, tmp_path):
    monkeypatch.setenv("GRASS_LLM_CACHE", str(fact_run["root"] / "cache"))
    runner = CliRunner()
    train, queries = str(tmp_path / "train.zarr"), str(tmp_path / "queries.zarr")
    assert runner.invoke(app, _cache_args(fact_run, train)).exit_code == 0
    assert runner.invoke(app, ["fisher", train]).exit_code == 0
    res = runner.invoke(app, _cache_args({**fact_run, "data": fact_run["queries"]}, queries,
                                         "--set", "add_eos=true"))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["query", train, "--query-store", queries, "--out",
                              str(tmp_path / "r.jsonl")], terminal_width=250)
    assert res.exit_code == 2
    assert "was cached with other special tokens" in " ".join(res.output.split())
